"""Train the built-in GPT with autotp tensor parallelism.

    torchrun --nproc-per-node 4 examples/train_gpt.py                  # gloo on CPU, NCCL on GPUs
    torchrun --nproc-per-node 4 examples/train_gpt.py --save ckpt      # save a sharded checkpoint
    torchrun --nproc-per-node 2 examples/train_gpt.py --load ckpt      # resume it on 2 ranks
    torchrun --nproc-per-node 4 examples/train_gpt.py --mesh 2x2       # a ("dp", "tp") mesh of 2 x 2

Character-level language modelling on a text file (default: this script's own source, so
nothing is downloaded). Every rank sees the same batch; autotp splits the model across ranks.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import autotp
from autotp.examples import GPT, GPTConfig

AXIS_NAMES = ("dp", "tp")  # a 2-D mesh's axes; the solver picks each axis's role (data, FSDP or tensor parallel)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=Path(__file__), help="training text (default: this file)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--memory-budget", default=None, help="bytes per device, e.g. 2MiB (default: a quarter of the full training state)")
    parser.add_argument("--save", type=Path, help="directory to save a sharded (DCP) checkpoint to at the end")
    parser.add_argument("--load", type=Path, help="directory of a DCP checkpoint to resume from (any world size)")
    parser.add_argument("--mesh", type=parse_mesh, default=None, help="mesh shape: 4 (1-D) or 2x2 (axes dp, tp); default: all ranks in 1-D")
    parser.add_argument("--seed", type=int, default=1337)
    return parser.parse_args(argv)


def parse_mesh(text: str) -> tuple[int, ...]:
    """``"4"`` -> (4,); ``"2x2"`` -> (2, 2): one size per mesh axis."""
    try:
        shape = tuple(int(size) for size in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh takes sizes joined by x (4, 2x2), got {text!r}") from None
    if not 1 <= len(shape) <= len(AXIS_NAMES) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--mesh takes 1 or {len(AXIS_NAMES)} positive sizes (4, 2x2), got {text!r}")
    return shape


def batches(data: torch.Tensor, *, batch: int, seq: int, seed: int):
    """Random windows of the text: (inputs, next-character targets), the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s: s + seq + 1] for s in starts.tolist()])  # (B, T + 1)
        yield window[:, :-1], window[:, 1:]


def progress(step: int, total: int, loss: float, seconds: float) -> str:
    width = 30
    filled = int(width * step / total)
    return f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{total}  loss {loss:.4f}  {seconds / max(step, 1) * 1e3:.0f} ms/step"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        torch.manual_seed(args.seed)  # the same model and stream on every rank
        data = torch.tensor(list(args.text.read_bytes()), dtype=torch.long)
        config = GPTConfig(vocab_size=256, block_size=args.seq, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
        model = GPT(config).to(device).train()
        example = (torch.zeros(args.batch, args.seq, dtype=torch.long, device=device),)
        state_nbytes = 4 * sum(p.numel() * p.element_size() for p in model.parameters())  # + grads + AdamW
        budget = args.memory_budget or int(state_nbytes / world_size * 1.25) if world_size > 1 else args.memory_budget
        shape = args.mesh or (world_size,)
        if math.prod(shape) != world_size:
            raise SystemExit(f"--mesh {'x'.join(map(str, shape))} has {math.prod(shape)} ranks but torchrun started {world_size}")
        if len(shape) == 1:
            mesh = init_device_mesh(device.type, shape)
        else:
            mesh = init_device_mesh(device.type, shape, mesh_dim_names=AXIS_NAMES[-len(shape):])
        sharded = autotp.parallelize(model, mesh, example, memory_budget=budget)
        del model  # the sharded module holds this rank's shards; the full weights can go
        log(sharded.plan.summary().splitlines()[-3])
        local = sum(p.numel() for p in sharded.parameters())
        log(f"{world_size} ranks on {device.type}, mesh {sharded.plan.mesh_text()}; rank 0 holds {local:,} parameters ({budget=} bytes)")
        optimizer = torch.optim.AdamW(sharded.parameters(), lr=args.lr)
        if args.load:
            state = autotp.sharded_state_dict(sharded)
            dcp.load(state, checkpoint_id=str(args.load))
            autotp.load_sharded_state_dict(sharded, state)
            log(f"resumed from {args.load}")

        started = time.perf_counter()
        stream = batches(data, batch=args.batch, seq=args.seq, seed=args.seed)
        for step in range(1, args.steps + 1):
            inputs, targets = next(stream)
            logits = sharded(inputs.to(device))
            loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if rank == 0 and (step % 5 == 0 or step == args.steps):
                sys.stdout.write(progress(step, args.steps, loss.item(), time.perf_counter() - started))
                sys.stdout.flush()
        log(f"\nfinal loss {loss.item():.4f}")
        if args.save:
            dcp.save(autotp.sharded_state_dict(sharded), checkpoint_id=str(args.save))
            log(f"saved a sharded checkpoint to {args.save}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
