"""One rank of the 2-process DDP test (gloo on the CPU): trains one step of a tiny GPT-2 on its own batch under the
training lens; rank 0 saves the DDP gradient the optimizer read, for the test's dense reference."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

#: each rank's batch
BATCHES = (["Paris is in France", "Ice is"], ["Danielle speaks French"])


def worker(rank: int, world: int, port: int, out: str, result: str) -> None:
    from blens_fast.default_model import load_default_tokenizer
    from blens_fast.training import training_lens

    from ..helpers import make_tiny_model
    from .test_training_lens import encode, dense_grads, reference_keys

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        tokenizer = load_default_tokenizer()
        model = make_tiny_model("gpt2")  # the same seed on every rank: the same weights; eval mode: no dropout
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with training_lens(ddp, tokenizer, every=1, k=5, rank=4, out=out) as tl:
            ddp(**encode(tokenizer, BATCHES[rank])).loss.backward()
            grads = dense_grads(model, reference_keys(model))
            opt.step()
        assert tl.writes == (rank == 0)
        if rank == 0:
            torch.save(grads, result)
    finally:
        dist.destroy_process_group()
