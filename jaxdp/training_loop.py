"""The loop of a training run and its bookkeeping: `TrainingLoop` (see `jaxdp.run`)."""

from __future__ import annotations

import logging
import time
from typing import Any

import jax

from jaxdp import checkpoint, randomness, sharding, steps
from jaxdp.memory import DeviceMemoryError, memory_advice, out_of_memory
from jaxdp.release import RunRelease, mechanism_record
from jaxdp.settings import Settings
from jaxdp.tracking import (
    Event,
    MetricsWriter,
    Observers,
    Progress,
    check_step,
    host_values,
    should_stop,
)
from jaxdp.workdir import RunMismatchError

log = logging.getLogger("jaxdp")


class TrainingLoop:
    """The training loop and its bookkeeping: checkpoints, the private and public records, the
    evaluations, the observers and the progress bar.

    Public records (epsilon, eval metrics, and the per-step DP releases: SNR estimate, adaptive
    clip norms, released fractions) go to metrics.jsonl only once a checkpoint covers their
    step: a step replayed after a crash (with other performance settings, hence other rounding)
    reuses its noise, and must never publish a second, differently computed release of it.
    Private records are written at once."""

    def __init__(self, s: Settings, wd, plan, secrets, release: RunRelease, lead, callbacks):
        self.s, self.plan, self.secrets, self.release, self.lead = s, plan, secrets, release, lead
        self.wd = wd
        self.ckpt = checkpoint.Checkpointer(wd, keep=s.train.keep_checkpoints)
        self.writer = MetricsWriter(wd, enabled=lead, tensorboard=s.train.tensorboard)
        self.notify = Observers(callbacks)
        self.pending: list[tuple[int, dict[str, Any]]] = []
        self.start, self.examples_seen, self.ledger, self.evaluators = 0, 0, {}, []
        self.fixed_seed = secrets.fixed_by_user and plan.enabled

    def restore(self, state, noise_key):
        """The latest checkpoint's state (or `state`); the records after it are dropped."""
        if (latest := self.ckpt.latest_step()) is not None:
            state, meta = self.ckpt.restore(latest, state)
            if self.plan.enabled and not steps.noise_key_matches(state, noise_key):
                raise RunMismatchError(
                    f"The checkpoint at step {latest} in {self.wd.checkpoints} was written with "
                    f"another noise key than {self.wd.run_record}: the two do not belong "
                    f"together. Use a new --workdir."
                )
            self.start, self.examples_seen = int(state.step), int(meta["examples_seen"])
            log.info(
                "Resumed at step %d (epsilon so far: %s).", self.start, meta["privacy"]["epsilon"]
            )
        if self.lead:  # records of steps after the checkpoint: replayed
            self.writer.truncate(self.start)
            self.release.truncate(self.start)
        sharding.sync_processes("jaxdp_logs")
        return state

    def public(self, step: int) -> dict[str, Any]:
        return {**self.plan.metrics(step), "noise_seed_fixed_by_user": self.secrets.fixed_by_user}

    def publish(self, upto: int) -> None:
        while self.pending and self.pending[0][0] <= upto:
            self.release.metrics(*self.pending.pop(0))

    def save(self, state, step: int) -> None:
        privacy = mechanism_record(self.plan, step, randomness=self.secrets.label)
        meta = {"privacy": privacy, "examples_seen": self.examples_seen, **self.ledger}
        self.ckpt.save(step, state, meta)
        self.notify(Event("checkpoint", step, self.plan.num_steps))
        self.publish(step)

    def evaluate(self, state, step: int) -> dict[str, float]:
        """The evaluators' metrics: computed only from a CHECKPOINTED state, so that a crash can
        never make the run release a second, differently computed version of them (a replayed
        step may differ in float rounding, dropout masks or dropped cell members when
        performance settings change on resume, and would reuse the same noise)."""
        if self.ckpt.latest_step() != step:
            self.save(state, step)
        metrics = {}
        for evaluator in self.evaluators:
            metrics.update(evaluator.run(state.params, state.frozen, step))
        if metrics:  # (no evaluation data: nothing to tell)
            self.notify(Event("eval", step, self.plan.num_steps, metrics))
        return metrics

    def is_eval_step(self, step: int) -> bool:
        return step % self.s.train.eval_every == 0 or step == self.plan.num_steps

    def train(self, state, compiled, batches, sampler, rows, cancel):
        """Steps from the restored one to the planned number, or until `cancel`: the final
        state and whether it was cancelled."""
        plan, start, dropout_key = self.plan, self.start, self.secrets.dropout_key()
        if start and self.is_eval_step(start) and not self.release.has_metric(start, "eval_loss"):
            # Killed between the checkpoint and its eval records: release them now, from it.
            self.release.metrics(start, {**self.public(start), **self.evaluate(state, start)})
        progress = Progress(self.s.train.progress and self.lead, start, plan.num_steps)
        if self.fixed_seed:
            log.warning("dp.noise_seed is set: %s.", randomness.FIXED_SEED_LABEL)
        self.notify(Event("start", start, plan.num_steps, self.public(start)))
        self.clock, self.tokens, cancelled = time.perf_counter(), 0, False
        with progress.logging_above():
            for step in range(start, plan.num_steps):
                if cancelled := should_stop(cancel):
                    break
                idx = sampler.sample(step)
                state, metrics = self.step(state, compiled, batches, idx, dropout_key, step)
                self.examples_seen += len(idx)
                self.tokens += int(rows.lengths[rows.rows_of(idx)].sum())
                progress.update(**self.record(state, step + 1, metrics))
        progress.close()
        return state, cancelled

    def step(self, state, compiled, batches, idx, dropout_key, step: int):
        """One noisy step on the drawn units `idx`: (state, metrics)."""
        step_key = randomness.dropout_step_key(dropout_key, step)
        try:
            acc = compiled.zero_accum(state.params, steps.clip_thresholds(state))
            for j, batch in enumerate(batches.physical(idx)):
                key = jax.random.fold_in(step_key, j)
                acc = compiled.grad_step(state.params, batch, key, acc, state.frozen)
            state, metrics = compiled.update_step(state, acc)
            jax.block_until_ready(metrics)  # an allocation failure surfaces here at last
        except jax.errors.JaxRuntimeError as e:
            if not out_of_memory(e):
                raise
            reason = str(e).strip().splitlines()[0][:200]
            advice = memory_advice(self.s, step + 1, self.ckpt.latest_step(), reason)
            raise DeviceMemoryError(advice) from e
        check_step(self.plan, metrics, step + 1, self.ckpt)
        return state, metrics

    def record(self, state, done: int, metrics) -> dict[str, str]:
        """The step's records, evaluation and checkpoint; the progress bar's postfix."""
        t, plan = self.s.train, self.plan
        public = self.public(done)
        released = host_values(metrics.pop("public", {}))  # DP releases (covered)
        private = host_values(metrics)
        evaluating = self.is_eval_step(done)
        if done % t.log_every == 0 or evaluating or done == 1:
            now = time.perf_counter()
            rate = self.tokens / max(now - self.clock, 1e-9)
            private.update(examples_seen=self.examples_seen, tokens_per_s=rate)
            self.clock, self.tokens = now, 0
            if evaluating:
                public.update(self.evaluate(state, done))  # (checkpointed at `done` first)
            self.writer.write(done, private)
            self.pending.append((done, {**public, **released}))
            if evaluating:
                self.publish(done)  # the evaluation's checkpoint covers it
        self.notify(Event("step", done, plan.num_steps, {**public, **released}, private))
        if (done % t.checkpoint_every == 0 or done == plan.num_steps) and (
            self.ckpt.latest_step() != done
        ):
            self.save(state, done)
        eps = public["epsilon"]
        label = ("~" if plan.approximate else "") + (" (fixed seed)" if self.fixed_seed else "")
        postfix = {"loss": f"{private['train_loss']:.3f}"}
        postfix["eps"] = ("inf" if eps is None else f"{eps:.3g}") + label
        if "eval_loss" in public:
            postfix["eval"] = f"{public['eval_loss']:.3f}"
        return postfix

    def close(self) -> None:
        self.writer.close()
        self.ckpt.close()
