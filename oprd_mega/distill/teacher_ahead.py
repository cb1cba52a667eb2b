"""The teacher one microbatch ahead of the student (``distillation.overlap_teacher``).

Instead of every teacher target of the step before the student starts, the step asks for
microbatch ``i``'s targets right before the student's forward of ``i`` and starts the teacher's
forward of ``i + 1`` right after it, so on CUDA the teacher's kernels (on a side stream) run
while the student's forward and backward of ``i`` do, and only two microbatches' targets are
alive at a time. On CPU the same calls run in that order, one after the other.

With several teachers each one on the student's layout runs ahead on the microbatches routed to
it: before the student's forward of ``i`` every teacher routed to ``i`` has its targets, and
after it each teacher starts on its next routed microbatch.

Only with the teacher on the student's layout and no pipeline parallelism: Megatron's
no-pipelining schedule runs microbatches strictly in order, and the teacher's tensor-parallel
collectives are issued in the same program order on every rank (the ranks of a tensor- or
context-parallel group hold the same microbatches, so the same routes).
"""

from __future__ import annotations

import contextlib
import time

import torch

from oprd_mega.distill.batch import DistillMicrobatch
from oprd_mega.distill.teacher import TeacherOutputs, TeacherPlan, teacher_pass


class TeacherAhead:
    """Fills ``outputs`` (its per-microbatch target dicts, already handed to the taps) one
    microbatch at a time, on the microbatches routed to teacher ``name`` (in the step's order
    ``microbatches``)."""

    def __init__(
        self,
        teacher: torch.nn.Module,
        microbatches: list[DistillMicrobatch],
        plan: TeacherPlan,
        name: str = "teacher",
    ) -> None:
        self.teacher, self.plan = teacher, plan
        self.microbatches = [batch for batch in microbatches if batch.routed_to(name)]
        self.position = {batch.index: n for n, batch in enumerate(self.microbatches)}
        # every microbatch of the step -> the position of this teacher's first one after it
        self.following: dict[int, int] = {}
        upcoming = len(self.microbatches)
        for batch in reversed(microbatches):
            self.following[batch.index] = upcoming
            upcoming = self.position.get(batch.index, upcoming)
        self.outputs = TeacherOutputs(
            targets={batch.index: {} for batch in self.microbatches}, opd_hidden={}
        )
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.started: set[int] = set()
        self.seconds = 0.0

    def ready(self, index: int) -> None:
        """Microbatch ``index``'s targets are usable on the current stream after this (nothing
        to do for a microbatch not routed to this teacher)."""
        if index not in self.position:
            return
        self._start(self.position[index])
        if self.stream is not None:
            current = torch.cuda.current_stream()
            current.wait_stream(self.stream)
            for tensor in self.outputs.targets[index].values():
                tensor.record_stream(current)
            if index in self.outputs.opd_hidden:
                self.outputs.opd_hidden[index].record_stream(current)

    def start_next(self, index: int) -> None:
        """Start the teacher on its first microbatch after ``index`` (none after its last)."""
        following = self.following[index]
        if following < len(self.microbatches):
            self._start(following)

    def _start(self, position: int) -> None:
        if position in self.started:
            return
        self.started.add(position)
        batch = self.microbatches[position]
        clock = time.perf_counter()
        context: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.stream is not None:  # after what the main stream queued so far
            self.stream.wait_stream(torch.cuda.current_stream())
            context = torch.cuda.stream(self.stream)
        with context:
            done = teacher_pass(self.teacher, [batch], self.plan)
        self.outputs.targets[batch.index].update(done.targets[batch.index])
        self.outputs.opd_hidden.update(done.opd_hidden)
        self.seconds += time.perf_counter() - clock
