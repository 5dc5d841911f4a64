"""A Trainer callback that times training steps after a warm-up, for the throughput benchmarks.

    timer = StepTimer(skip=1); trainer = XTrainer(..., callbacks=[timer]); timer.trainer = trainer
    trainer.train(); timer.figures()  # steps, seconds, real tokens/s

The first steps pay for lazy initialisation (kernels, allocator, the optimizer state), so the
clock starts after `skip` of them. Tokens are the ones TRL's trainers count themselves
(`_total_train_tokens`: the attention mask's ones, i.e. real tokens). On a GPU, `sync` (e.g.
torch.cuda.synchronize) makes the clock wait for the queued kernels.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self, skip: int = 1, sync=None):
        self.skip, self.sync, self.trainer = skip, sync or (lambda: None), None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.skip:
            self.sync()
            self.t0, self.tokens0 = time.perf_counter(), self.trainer._total_train_tokens

    def on_train_end(self, args, state, control, **kwargs):
        self.sync()
        self.seconds = time.perf_counter() - self.t0
        self.tokens = self.trainer._total_train_tokens - self.tokens0
        self.steps = state.global_step - self.skip
        self.trainer = None  # the trainer holds the model and optimizer: let them be freed

    def figures(self) -> dict:
        """What the benchmarks report of a timed run."""
        return {"timed_steps": self.steps, "seconds": self.seconds, "real_tokens_per_s": self.tokens / self.seconds}
