"""CUDA checks, run on a GPU machine (`pytest -m gpu`); skipped where there is no CUDA device."""

from __future__ import annotations

import pytest
import torch

from model import MicroTransformer
from model.losses import lm_loss
from model.utils import get_sample_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CFG = dict(vocab_size=5000, max_seq_len=512, embed_dim=160, num_heads=5, num_layers=5,
           ff_dim=640, dropout=0.0)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cpu = MicroTransformer(**CFG).eval()
    gpu = MicroTransformer(**CFG).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def test_cuda_forward_matches_cpu(models):
    cpu, gpu = models
    ids, _ = get_sample_data(2, 128, CFG["vocab_size"], seed=0)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.cuda(), mask.cuda()).cpu(), cpu(ids, mask),
                                   atol=2e-4, rtol=2e-4)


def test_cuda_kv_cache_equals_recompute(models):
    _, gpu = models
    ids, _ = get_sample_data(3, 12, CFG["vocab_size"], seed=1)
    ids = ids.cuda()
    a = gpu.generate(ids, max_new_tokens=40, do_sample=False)
    b = gpu.generate(ids, max_new_tokens=40, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_bf16_autocast_training_reduces_loss():
    torch.manual_seed(0)
    model = MicroTransformer(**CFG).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=True)
    ids, _ = get_sample_data(8, 128, CFG["vocab_size"], seed=2)
    ids = ids.cuda()
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
