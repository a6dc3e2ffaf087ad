"""The garbage collector's settings for a long-running replica (process-wide, set at start).

Nearly every object a replica makes dies by reference counting; the cyclic collector finds
little, but each full collection walks every live object: the ~200,000 that importing
FastAPI, pydantic and the app leaves behind, and, with a thousand SSE watchers, their tasks,
frames and buffers. Profiled with 1,000 watchers, collections were about a tenth of the
replica's CPU. So: once the app is imported and started, its objects are moved out of the
collector's sight (`gc.freeze`: they live as long as the process anyway), and the youngest
generation is collected after GEN0_THRESHOLD allocations instead of 700, so the burst of
objects a thousand streams make between two writes is not scanned over and over.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 20_000  # allocations minus deallocations before a young collection (default 700)


def tune_for_serving() -> None:
    """Freeze what exists now and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
