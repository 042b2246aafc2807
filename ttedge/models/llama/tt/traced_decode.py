"""Decode captured once as a trace and replayed each step (tt_transformers' ``Generator._easy_trace_text``).

A trace records the commands of every op of ``Transformer.decode_on_device`` with the addresses of the
buffers they read and write; replaying it skips the host's per-op dispatch work. So the step's inputs live
in device tensors allocated once (``DecodeTensors``), and each step copies its tokens, positions, page
table and cos/sin into them in place before the replay; the replay writes its result into the same output
tensor every time. Greedy steps (argmax on the device) and logits steps end in different ops, so each is
its own trace, captured the first time it is asked for.

The device must be opened with a trace region (``ttnn.open_device(trace_region_size=...)``; ttnn 0.81.1's
default is 0). On the TT validation tier's mock clusters capturing a program or replaying a trace crashes
the process (docs/tt-validation.md), so there the runner decodes untraced through the same op sequence.
"""

from __future__ import annotations

import numpy as np
import ttnn

from ttedge.models.llama.tt.model import DecodeTensors, Transformer

# The command queue every capture and replay uses: the runner issues everything on one queue.
QUEUE = 0


class TracedDecode:
    """``Transformer.decode`` with the same arguments and results, captured and replayed."""

    def __init__(self, model: Transformer):
        self.model = model
        self.inputs: DecodeTensors | None = None
        # Per output kind (greedy or not): the trace and the device tensor each replay writes.
        self.traces: dict[bool, tuple[ttnn.MeshTraceId, ttnn.Tensor]] = {}

    def __call__(
        self, tokens: np.ndarray, positions: np.ndarray, page_table: np.ndarray, greedy: bool = False
    ) -> ttnn.Tensor:
        """Returns the trace's output tensor, valid until the next call; reading it back waits for the
        replay (``execute_trace`` is issued non-blocking, and reads go through the same queue)."""
        host = self.model.decode_host_inputs(tokens, positions, page_table)
        if self.inputs is None:
            # Allocated before any capture, and never again: the traces read these buffers' addresses.
            self.inputs = self.model.decode_inputs_to_device(host)
        else:
            host.copy_to(self.inputs)
        if greedy not in self.traces:
            self.traces[greedy] = self._capture(self.inputs, greedy)
        trace_id, output = self.traces[greedy]
        ttnn.execute_trace(self.model.mesh, trace_id, cq_id=QUEUE, blocking=False)
        return output

    def _capture(self, inputs: DecodeTensors, greedy: bool) -> tuple[ttnn.MeshTraceId, ttnn.Tensor]:
        # A compile run first, as tt_transformers does: it builds every program outside the capture, which
        # only records commands. It computes this very step, so the K/V it writes are the ones the replay
        # then writes again at the same positions.
        self.model.decode_on_device(inputs, greedy)
        trace_id = ttnn.begin_trace_capture(self.model.mesh, cq_id=QUEUE)
        output = self.model.decode_on_device(inputs, greedy)
        ttnn.end_trace_capture(self.model.mesh, trace_id, cq_id=QUEUE)
        return trace_id, output
