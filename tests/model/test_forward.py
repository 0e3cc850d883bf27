"""Forward pass: shapes, causality, padding, initial loss, training, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import MicroTransformer
from model.losses import lm_loss
from model.utils import create_causal_mask, get_sample_data, load_model_config, save_model_config
from tests.conftest import TINY


def test_logits_shape(tiny_model):
    ids, mask = get_sample_data(3, 20, TINY["vocab_size"], seed=0)
    assert tiny_model(ids, mask).shape == (3, 20, TINY["vocab_size"])


def test_causality_future_tokens_do_not_change_past_logits(tiny_model):
    ids, _ = get_sample_data(2, 24, TINY["vocab_size"], seed=1)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % TINY["vocab_size"]
    a, b = tiny_model(ids), tiny_model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_right_padding_leaves_real_positions_unchanged(tiny_model):
    ids, _ = get_sample_data(1, 10, TINY["vocab_size"], seed=2)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    out = tiny_model(padded, mask)
    torch.testing.assert_close(out[:, :10], tiny_model(ids))
    assert torch.isfinite(out).all()


def test_left_padding_matches_unpadded_and_gives_no_nan(tiny_model):
    ids, _ = get_sample_data(1, 10, TINY["vocab_size"], seed=3)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 10)], dim=1).long()
    out = tiny_model(padded, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 5:], tiny_model(ids), atol=1e-5, rtol=1e-5)


def test_mixed_batch_padding_rows_are_independent(tiny_model):
    a, _ = get_sample_data(1, 12, TINY["vocab_size"], seed=4)
    b, _ = get_sample_data(1, 7, TINY["vocab_size"], seed=5)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = tiny_model(batch, mask)
    torch.testing.assert_close(out[0], tiny_model(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 5:], tiny_model(b)[0], atol=1e-5, rtol=1e-5)


def test_causal_mask_helper():
    m = create_causal_mask(4)
    assert m.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    assert torch.equal(m, expected)


def test_initial_loss_is_near_ln_vocab():
    torch.manual_seed(0)
    vocab = 5000
    model = MicroTransformer(vocab_size=vocab, max_seq_len=64, dropout=0.0).eval()
    ids, _ = get_sample_data(4, 64, vocab, seed=0)
    with torch.no_grad():
        loss = lm_loss(model(ids), ids).item()
    assert abs(loss - math.log(vocab)) < 0.15, loss


def test_gpt2_init_also_starts_near_ln_vocab():
    torch.manual_seed(0)
    model = MicroTransformer(vocab_size=500, max_seq_len=64, init="gpt2", dropout=0.0).eval()
    ids, _ = get_sample_data(4, 64, 500, seed=0)
    with torch.no_grad():
        loss = lm_loss(model(ids), ids).item()
    assert abs(loss - math.log(500)) < 0.15, loss


def test_seed_training_loop_overfits_one_batch():
    """The spec's section-2 loop, verbatim in structure, drives the loss of one batch down."""
    torch.manual_seed(0)
    model = MicroTransformer(**TINY, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    criterion = torch.nn.CrossEntropyLoss()
    input_ids, attention_mask = get_sample_data(4, 16, TINY["vocab_size"], seed=0)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids}
    losses = []
    for _epoch in range(60):
        for batch_ in [batch]:
            logits = model(batch_["input_ids"], batch_["attention_mask"])
            shift_logits = logits[:, :-1, :].contiguous()
            shift_labels = batch_["labels"][:, 1:].contiguous()
            loss = criterion(shift_logits.view(-1, model.vocab_size), shift_labels.view(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[0] > 4.0
    assert losses[-1] < 0.3 * losses[0], losses[-1]


def test_state_dict_round_trip(tmp_path, tiny_model):
    path = tmp_path / "micro_transformer.pt"
    torch.save(tiny_model.state_dict(), path)
    loaded = MicroTransformer(**TINY, dropout=0.0)
    loaded.load_state_dict(torch.load(path, weights_only=True))
    loaded.eval()
    ids, _ = get_sample_data(2, 16, TINY["vocab_size"], seed=7)
    torch.testing.assert_close(loaded(ids), tiny_model(ids), rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.token_embedding.weight  # still tied after loading


def test_model_config_json_round_trip(tmp_path, tiny_model):
    path = tmp_path / "config.json"
    save_model_config(tiny_model, path)
    assert load_model_config(path) == tiny_model.config
    assert not list(tmp_path.glob("*.tmp"))


def test_dropout_active_only_in_training():
    torch.manual_seed(0)
    model = MicroTransformer(**TINY, dropout=0.5)
    ids, _ = get_sample_data(2, 16, TINY["vocab_size"], seed=8)
    model.train()
    assert not torch.allclose(model(ids), model(ids))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))


def test_forward_with_labels_returns_the_chunked_loss_with_same_gradients():
    torch.manual_seed(0)
    a = MicroTransformer(**TINY, dropout=0.0)
    b = MicroTransformer(**TINY, dropout=0.0)
    b.load_state_dict(a.state_dict())
    ids, _ = get_sample_data(3, 20, TINY["vocab_size"], seed=9)
    expected = lm_loss(a(ids), ids)
    got = b(ids, labels=ids)
    assert got.dim() == 0 and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the evaluation path skips the gradient work, same value
        torch.testing.assert_close(b(ids, labels=ids), got.detach(), atol=0, rtol=0)
    expected.backward()
    got.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_labels_shape_must_match_input(tiny_model):
    ids, _ = get_sample_data(2, 8, TINY["vocab_size"], seed=1)
    with pytest.raises(ValueError, match="labels has shape"):
        tiny_model(ids, labels=ids[:, :4])


# ---------------------------------------------------------------- attention dropout
def test_attn_dropout_defaults_to_dropout_and_can_be_set_apart() -> None:
    seed_model = MicroTransformer(**TINY, dropout=0.1)
    assert seed_model.config.attn_dropout is None
    assert all(b.attn.dropout == 0.1 for b in seed_model.blocks)  # the seed's model
    apart = MicroTransformer(**TINY, dropout=0.1, attn_dropout=0.0)
    assert all(b.attn.dropout == 0.0 for b in apart.blocks)
    assert all(b.attn.resid_dropout.p == 0.1 and b.ff.dropout.p == 0.1 for b in apart.blocks)
    assert apart.dropout.p == 0.1
    assert apart.config.attention_dropout == 0.0
    assert seed_model.config.attention_dropout == 0.1


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's "kernel not used" notes
def test_attn_dropout_zero_keeps_training_on_the_fused_cpu_kernel() -> None:
    ids, _ = get_sample_data(2, 16, TINY["vocab_size"], seed=3)
    apart = MicroTransformer(**TINY, dropout=0.1, attn_dropout=0.0).train()
    seed_model = MicroTransformer(**TINY, dropout=0.1).train()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only the fused kernel allowed
        apart(ids, labels=ids).backward()  # residual dropout still on, attention fused
        with pytest.raises(RuntimeError):  # attention-probability dropout needs the math path
            seed_model(ids, labels=ids)
    # residual/embedding dropout is still active in training mode
    torch.manual_seed(0)
    a = apart(ids)
    torch.manual_seed(1)
    b = apart(ids)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.1"])
def test_attn_dropout_out_of_range_is_refused_by_name(bad) -> None:
    with pytest.raises(ValueError, match="attn_dropout"):
        MicroTransformer(**TINY, attn_dropout=bad)


def test_attn_dropout_survives_the_config_file(tmp_path) -> None:
    model = MicroTransformer(**TINY, dropout=0.1, attn_dropout=0.0)
    save_model_config(model.config, tmp_path / "config.json")
    assert load_model_config(tmp_path / "config.json").attn_dropout == 0.0
