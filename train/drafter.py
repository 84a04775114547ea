"""Train a drafter on the target's own output: `python -m train.drafter --target DIR --drafter {block,eagle3}
--data PATH --out DIR [...]` (`--help` explains every flag; `--config FILE` reads them from JSON or TOML).

1. prompts from --data are tokenized and the target answers them with our engine in the served decoding mode
   (out/regenerated.jsonl, reused by a resumed run);
2. the (prompt, response) pairs are packed into fixed-length rows and fed by a grain pipeline;
3. each step runs the frozen target over the rows for the drafter's features (nothing is dumped to disk), then
   the drafter's loss (train/losses.py), AdamW with warm-up and cosine decay, gradient clipping, bf16 compute
   over float32 master weights, on one (dp, ep, tp) mesh of every device: the target's parameters placed by
   sharding/'s rules (heads, MLP columns and vocabulary over --tp, a MoE target's experts over --ep) so XLA
   partitions the same model code, the drafter and its optimiser state replicated, the batch split over
   dp = devices / (tp * ep); with tp * ep > 1 the engine of steps 1 and 5 runs on that sharded target too;
4. orbax checkpoints (parameters, optimiser, step, data-iterator position) every --checkpoint-every steps and at
   the end; a run finding a checkpoint in --out resumes from it and continues the same loss curve;
5. acceptance length (tokens per target forward of the real speculative loop) on held-out prompts is logged with
   the loss in out/metrics.jsonl; the drafter is exported to out/drafter for `drafters.checkpoint.load_drafter`.
Exit codes: 0 done, 2 a bad flag, config or data file (one line on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from codegen_jax import CheckpointError, ConfigError, EngineConfig, SamplingParams, Tokenizer, load_model
from codegen_jax.parallel import replica_engine
from drafters.block_drafter import BlockDrafter, BlockDrafterConfig
from drafters.checkpoint import save_drafter
from drafters.eagle3 import Eagle3Config, Eagle3Drafter
from drafters.neural import NeuralDrafter
from drafters.speculative import SpeculativeDecoder
from sharding.mesh import make_mesh
from sharding.rules import param_shardings
from train.checkpointing import Checkpointer
from train.config import TrainConfig, UsageError, parse
from train.data import DataError, DataIterator, dataset, load_prompts, pack
from train.losses import block_loss, eagle3_loss
from train.regenerate import regenerate
from train.target_features import target_forward


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Low, middle and high target layers (distinct, sorted): 1, L/2, L-2 as EAGLE-3 picks them for deep targets,
    the first, middle and last for shallow ones."""
    if num_layers > 4:
        return (1, num_layers // 2, num_layers - 2)
    return tuple(sorted({0, num_layers // 2, num_layers - 1}))


def build_drafter(cfg: TrainConfig, target_cfg, responses: list[list[int]], dtype: str):
    """A fresh drafter (parameters in `dtype`); EAGLE-3's draft vocabulary is the responses' most frequent tokens."""
    layers = cfg.layers or default_layers(target_cfg.num_layers)
    shape = dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                 context=cfg.context, rms_norm_eps=target_cfg.rms_norm_eps, dtype=dtype)
    D, V = target_cfg.hidden_size, target_cfg.vocab_size
    if cfg.drafter == "block":
        return BlockDrafter(BlockDrafterConfig(D, layers, block_size=cfg.block_size, num_layers=cfg.num_layers,
                                               **shape), rngs=nnx.Rngs(cfg.seed))
    Vd = min(cfg.draft_vocab_size, V)
    model = Eagle3Drafter(Eagle3Config(D, layers, V, Vd, draft_len=cfg.draft_len, **shape), rngs=nnx.Rngs(cfg.seed))
    counts = Counter(t for r in responses for t in r)
    ranked = [t for t, _ in counts.most_common(Vd)]
    ranked += [t for t in range(V) if t not in counts][: Vd - len(ranked)]  # unseen ids fill the rest, lowest first
    model.d2t.set_value(jnp.asarray(sorted(ranked), jnp.int32))
    return model


def schedule(cfg: TrainConfig) -> optax.Schedule:
    warmup = max(cfg.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                              end_value=cfg.lr * cfg.min_lr_ratio)


def training_mesh(cfg: TrainConfig, devices=None) -> Mesh:
    """The run's (dp, ep, tp) mesh over `devices` (default: every process's): tp * ep devices hold one copy of the
    target, dp = devices / (tp * ep) of them split the batch. Raises UsageError when the flags do not fit."""
    devices = list(jax.devices() if devices is None else devices)
    group = cfg.tp * cfg.ep
    if len(devices) % group:
        raise UsageError(f"--tp {cfg.tp} times --ep {cfg.ep} must divide the device count ({len(devices)})")
    if jax.process_count() > 1 and jax.local_device_count() % group:  # each host feeds its own dp rows
        raise UsageError(f"--tp {cfg.tp} times --ep {cfg.ep} must divide each host's device count "
                         f"({jax.local_device_count()})")
    dp = len(devices) // group
    if cfg.batch_size % dp:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the {dp} data-parallel groups "
                         f"(devices / (tp * ep))")
    return make_mesh(dp=dp, tp=cfg.tp, ep=cfg.ep, devices=devices)


class Trainer:
    """The jitted step and the state it updates, on `training_mesh(cfg, devices)`. The frozen target's parameters
    get sharding/'s rules (the same table the sharded engine uses: heads, MLP columns and vocabulary over 'tp',
    experts over 'ep', replicated over 'dp'), so GSPMD partitions `target_forward` with the unchanged model code.
    The drafter's float32 parameters as a flat list (one pytree for optax and orbax), the optimiser state and the
    step are replicated: the rules do not name the drafter's paths (fc.weight, layers.0.q_proj.weight, ...) and a
    drafter is small. Batches are split over 'dp'."""

    def __init__(self, cfg: TrainConfig, model, target, devices=None):
        self.cfg = cfg
        self.capture = tuple(model.cfg.target_layers)
        self.mesh = training_mesh(cfg, devices)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("dp"))
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        leaves, self.treedef = jax.tree.flatten(params)
        self.tgraph, tstate = nnx.split(target)
        tstate = jax.device_put(tstate, param_shardings(tstate, self.mesh))  # a no-op for a sharded engine's target
        self.target_leaves, self.ttreedef = jax.tree.flatten(tstate)
        self.optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                                     optax.adamw(schedule(cfg), b1=0.9, b2=0.95, weight_decay=cfg.weight_decay))
        leaves = [jnp.asarray(x, jnp.float32) for x in leaves]
        # All of the state placed, and pinned out of the step: an uncommitted step counter or optimiser count, or
        # a drafter leaf that propagation splits over 'tp' next to the vocab-split head, would change the layout
        # between steps and recompile the step.
        self.state = jax.device_put({"params": leaves, "opt": self.optimizer.init(leaves),
                                     "step": jnp.zeros((), jnp.int32)}, self.replicated)
        self._step = jax.jit(self._train_step, donate_argnums=0, out_shardings=self.replicated)

    def _train_step(self, state, target_leaves, rest, batch):
        cfg = self.cfg
        cdt = jnp.dtype(cfg.compute_dtype)
        target = nnx.merge(self.tgraph, jax.tree.unflatten(self.ttreedef, target_leaves))
        feats, hidden = target_forward(target, batch["tokens"], batch["segments"], batch["positions"],
                                       self.capture)
        embed = target.embed_tokens.weight[...]
        head = embed if target.lm_head is None else target.lm_head.weight[...]
        key = jax.random.fold_in(jax.random.key(cfg.seed), state["step"])  # from the step: resumes draw the same

        def loss_fn(leaves):
            compute = [x.astype(cdt) for x in leaves]  # bf16 compute; the float32 masters get the update
            model = nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, compute), rest)
            if cfg.drafter == "block":
                return block_loss(model, embed, head, feats.astype(cdt), batch, key, num_blocks=cfg.num_blocks,
                                  decay=cfg.position_decay)
            return eagle3_loss(model, embed, head, feats.astype(cdt), hidden, batch, key, num_blocks=cfg.num_blocks,
                               decay=cfg.position_decay)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = self.optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

    def step(self, host_batch: dict[str, np.ndarray]) -> dict:
        batch = {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in host_batch.items()}
        self.state, metrics = self._step(self.state, self.target_leaves, self.rest, batch)
        return metrics

    def model(self, dtype: str):
        """The drafter with the current parameters cast to `dtype` (what is exported and evaluated)."""
        leaves = [jnp.asarray(x, dtype) for x in jax.device_get(self.state["params"])]
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves), self.rest)
        model.cfg = dataclasses.replace(model.cfg, dtype=dtype)
        return model


def evaluate(spec: SpeculativeDecoder, drafter: NeuralDrafter, model, prompts, params) -> dict:
    """Acceptance length: tokens per target forward of the real speculative loop (1 + accepted drafts)."""
    drafter.params = nnx.split(model)[1]  # same shapes: the drafter's jitted draft is not recompiled
    done = spec.generate(prompts, params)
    tokens, forwards = sum(len(c.tokens) for c in done), sum(c.forwards for c in done)
    return {"acceptance_length": tokens / max(forwards, 1),
            "accepted_per_forward": sum(c.accepted for c in done) / max(forwards, 1)}


class Metrics:
    """metrics.jsonl (and TensorBoard when tensorboardX is installed). A resumed run drops the rows past the
    restored step, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int):
        rows = []
        if resume_step and path.exists():
            rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.file = open(path, "a")  # noqa: SIM115 - open for the run's life
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()


def run(cfg: TrainConfig) -> int:
    training_mesh(cfg)  # before anything slow: a bad --tp, --ep or --batch-size fails at once
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_dir(cfg.target)
    prompts = [p[-cfg.max_prompt_len :] for p in load_prompts(cfg.data, tok, code_task=cfg.code_task,
                                                               cuts_per_file=cfg.cuts_per_file)]
    if cfg.eval_data:
        held = [p[-cfg.max_prompt_len :] for p in load_prompts(cfg.eval_data, tok, code_task=cfg.code_task,
                                                                cuts_per_file=cfg.cuts_per_file)]
    else:
        if cfg.eval_every and len(prompts) <= cfg.eval_prompts:
            raise DataError(f"{cfg.data}: {len(prompts)} prompts leave none to train on after holding out "
                            f"--eval-prompts {cfg.eval_prompts}; add prompts or pass --eval-data")
        held, prompts = (prompts[-cfg.eval_prompts :], prompts[: -cfg.eval_prompts]) if cfg.eval_every else ([],
                                                                                                         prompts)
    held = held[: cfg.eval_prompts]
    # the target is read straight onto its shards, split as the trainer will hold it (this host's devices), once
    local = jax.local_devices()
    mesh = (make_mesh(dp=len(local) // (cfg.tp * cfg.ep), tp=cfg.tp, ep=cfg.ep, devices=local)
            if cfg.tp * cfg.ep > 1 else None)
    target = load_model(cfg.target, dtype=jnp.dtype(cfg.target_dtype), progress=not cfg.no_progress, mesh=mesh)
    if cfg.ep > 1 and not target.cfg.is_moe:
        raise UsageError(f"--ep {cfg.ep} splits a MoE target's experts, but {cfg.target} is a dense model; use --tp")
    stop = tuple(target.cfg.eos_token_ids) or ((tok.eos_token_id,) if tok.eos_token_id is not None else ())
    longest = max(map(len, prompts + held)) + max(cfg.max_new_tokens, cfg.eval_max_new_tokens)
    ecfg = EngineConfig(max_slots=cfg.slots, page_size=16, max_seq_len=-(-longest // 16) * 16,
                        prefill_chunk=min(512, 1 << (longest - 1).bit_length()))
    engine = replica_engine(target, ecfg, mesh, strategy="xla")
    sp = lambda i, n: SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                     seed=(cfg.seed * 1_000_003 + i) % 2**32, max_new_tokens=n, stop_token_ids=stop)
    meta = {"target": str(Path(cfg.target).absolute()), "temperature": cfg.temperature, "top_k": cfg.top_k,
            "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    pairs = regenerate(engine, prompts, [sp(i, cfg.max_new_tokens) for i in range(len(prompts))],
                       out / "regenerated.jsonl", meta=meta, progress=not cfg.no_progress)
    packed = pack(pairs, cfg.seq_len)
    n_proc = jax.process_count()
    data = DataIterator(dataset(packed, cfg.batch_size // n_proc, seed=cfg.seed, shard=jax.process_index(),
                                num_shards=n_proc))

    try:
        model = build_drafter(cfg, target.cfg, [r for _, r in pairs], "float32")
    except ValueError as e:  # the drafter configs validate the shape flags
        raise UsageError(str(e)) from e
    trainer = Trainer(cfg, model, target)
    ckpt = Checkpointer(out / "checkpoints", keep=cfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        trainer.state, data_state = ckpt.restore(start, trainer.state)
        data.restore(data_state)
    metrics = Metrics(out / "metrics.jsonl", start)
    export_dtype = cfg.export_dtype or cfg.target_dtype
    spec = drafter = None
    eval_params = [sp(10**6 + i, cfg.eval_max_new_tokens) for i in range(len(held))]

    def do_eval(step: int) -> None:
        nonlocal spec, drafter
        m = trainer.model(export_dtype)
        if drafter is None:
            drafter = NeuralDrafter(m, target, cfg.slots)
            spec = SpeculativeDecoder(engine, drafter)
        row = {"step": step, **evaluate(spec, drafter, m, held, eval_params)}
        metrics.write(row)
        tqdm.write(f"step {step}: acceptance length {row['acceptance_length']:.3f}")

    if cfg.eval_every and held and start == 0:
        do_eval(0)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.drafter}", unit="step", disable=cfg.no_progress)
    t0, tokens = time.perf_counter(), 0
    for step in range(start + 1, cfg.steps + 1):
        batch = next(data)
        m = trainer.step(batch)
        tokens += int(batch["loss"].sum()) * n_proc
        if step % cfg.log_every == 0 or step == cfg.steps or step == start + 1:
            row = {"step": step, **{k: float(v) for k, v in m.items()}, "lr": float(schedule(cfg)(step - 1)),
                   "response_tokens_per_s": tokens / (time.perf_counter() - t0)}
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ckpt.save(step, trainer.state, data.state())
        if cfg.eval_every and held and (step % cfg.eval_every == 0 or step == cfg.steps):
            do_eval(step)
        if step == cfg.stop_after_step:
            metrics.close()
            return 0  # as if killed: nothing past the last periodic checkpoint
    bar.close()
    ckpt.close()
    metrics.close()
    save_drafter(trainer.model(export_dtype), out / "drafter")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
        return run(cfg)
    except (DataError, UsageError, CheckpointError, ConfigError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
