import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lpq
from lpq.config import from_dict
from lpq.quant import QuantRecipe
from lpq.quant.quantizer import TensorQuantizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from lpq.models.tiny import tiny_causal_lm

        torch.set_num_threads(1)
        model = tiny_causal_lm("tiny-qwen3-moe")    # same seed: same weights on both ranks
        recipe = from_dict({"weight": {"format": "hif8", "scaling": "delayed"},
                            "input": {"format": "hif8", "scaling": "delayed"},
                            "attention": {"format": "hif8", "p": {"format": "hif8", "scaling": "delayed"}}},
                           QuantRecipe)
        lpq.quantize_model(model, recipe)
        model.train()
        g = torch.Generator().manual_seed(100 + rank)   # different data per rank
        for _ in range(3):
            ids = torch.randint(4, 1000, (2, 10), generator=g)
            model(input_ids=ids).logits.float().pow(2).mean().backward()
        model(input_ids=ids)           # its pre-forward hook folds in the last step
        state = {n: m.scale.clone() for n, m in model.named_modules()
                 if isinstance(m, TensorQuantizer) and hasattr(m, "scale")}
        history = {n: m.amax_history.clone() for n, m in model.named_modules()
                   if isinstance(m, TensorQuantizer) and hasattr(m, "amax_history")}
        torch.save({"scale": state, "history": history}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_end_with_identical_scales(tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    for _ in range(240):
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        raise AssertionError("distributed workers timed out")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["scale"].keys() == r1["scale"].keys() and len(r0["scale"]) > 10
    for name in r0["scale"]:
        assert torch.equal(r0["scale"][name], r1["scale"][name]), name
        assert torch.equal(r0["history"][name], r1["history"][name]), name
    # the ranks saw different data, so the shared history is the MAX over both
    assert any(bool((h > 0).any()) for h in r0["history"].values())
