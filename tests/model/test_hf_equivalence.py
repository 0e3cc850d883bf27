"""Numerical equivalence with Hugging Face GPT-2 after copying the weights over."""

from __future__ import annotations

import math

import pytest
import torch

from model import MicroTransformer

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=101, max_seq_len=40, embed_dim=48, num_heads=4, num_layers=3, ff_dim=80)


def to_hf(model: MicroTransformer):
    """Build a GPT2LMHeadModel holding `model`'s weights (scale folded into wte, head untied)."""
    c = model.config
    hf_cfg = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.embed_dim,
        n_layer=c.num_layers, n_head=c.num_heads, n_inner=c.ff_dim,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, tie_word_embeddings=False,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    sd = model.state_dict()
    with torch.no_grad():
        t = hf.transformer
        t.wte.weight.copy_(sd["token_embedding.embedding.weight"] * math.sqrt(c.embed_dim))
        t.wpe.weight.copy_(sd["position_embedding.embedding.weight"])
        for i, h in enumerate(t.h):
            p = f"blocks.{i}."
            h.ln_1.weight.copy_(sd[p + "ln1.weight"])
            h.ln_1.bias.copy_(sd[p + "ln1.bias"])
            h.attn.c_attn.weight.copy_(sd[p + "attn.qkv.weight"].T)  # Conv1D is (in, out)
            h.attn.c_attn.bias.copy_(sd[p + "attn.qkv.bias"])
            h.attn.c_proj.weight.copy_(sd[p + "attn.proj.weight"].T)
            h.attn.c_proj.bias.copy_(sd[p + "attn.proj.bias"])
            h.ln_2.weight.copy_(sd[p + "ln2.weight"])
            h.ln_2.bias.copy_(sd[p + "ln2.bias"])
            h.mlp.c_fc.weight.copy_(sd[p + "ff.fc.weight"].T)
            h.mlp.c_fc.bias.copy_(sd[p + "ff.fc.bias"])
            h.mlp.c_proj.weight.copy_(sd[p + "ff.proj.weight"].T)
            h.mlp.c_proj.bias.copy_(sd[p + "ff.proj.bias"])
        t.ln_f.weight.copy_(sd["ln_f.weight"])
        t.ln_f.bias.copy_(sd["ln_f.bias"])
        hf.lm_head.weight.copy_(sd["token_embedding.embedding.weight"])
    return hf


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = MicroTransformer(**CFG, dropout=0.0).eval()
    with torch.no_grad():  # non-trivial norms and biases so the comparison covers them
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model, to_hf(model)


def test_hidden_states_and_logits_match_gpt2(pair):
    model, hf = pair
    ids = torch.randint(0, CFG["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_hidden = model.hidden_states(ids, torch.arange(40))
        theirs = hf(ids, output_hidden_states=True)
        theirs_hidden = theirs.hidden_states[-1]  # after ln_f
        torch.testing.assert_close(ours_hidden, theirs_hidden, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(ids), theirs.logits, atol=1e-4, rtol=1e-4)


def test_padded_batch_matches_gpt2_with_position_ids(pair):
    model, hf = pair
    ids = torch.randint(0, CFG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[1, 4:], theirs[1, 4:], atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_gpt2(pair):
    model, hf = pair
    prompt = torch.randint(0, CFG["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(3))
    ours = model.generate(prompt, max_new_tokens=20, do_sample=False)
    theirs = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(ours, theirs)
