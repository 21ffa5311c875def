"""Staging buffers of the background updater (:mod:`.background`): ``depth`` chunks, allocated and
registered with the transport when an update begins, freed when it completes."""
from __future__ import annotations

import torch

__all__ = ["StagingBuffers", "bg_staging_name"]


def bg_staging_name(weight_name: str, buf: int) -> str:
    """Name under which staging buffer ``buf`` of ``weight_name`` is registered."""
    return f"staging/bg{buf}/{weight_name}"


class StagingBuffers:
    """Mixin of :class:`~.background.BackgroundUpdater` (uses its ``weights, transport, placement,
    layers_per_chunk, depth, _staging, _bufs, _threads, _submit`` and sets ``staging_peak``)."""

    def _sync_staging(self, on: bool) -> None:
        """Allocate (``on``) or shrink to one row the synchronous updater's staging."""
        from .updater import staging_name

        rows = self.layers_per_chunk * self.placement.slots_per_rank if on else 1
        for name, t in self.weights.items():
            if self._staging[name].shape[0] != rows:
                self._staging[name] = torch.empty((rows,) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
                self.transport.register(staging_name(name), self._staging[name].view(rows, -1))

    def _alloc_staging(self) -> None:
        if self._bufs:
            return
        S = self.placement.slots_per_rank
        for b in range(self.depth):
            bufs = {}
            for name, t in self.weights.items():
                bufs[name] = torch.empty((self.layers_per_chunk * S,) + tuple(t.shape[2:]), dtype=t.dtype,
                                         device=t.device)
                self.transport.register(bg_staging_name(name, b), bufs[name].view(bufs[name].shape[0], -1))
            self._bufs.append(bufs)
        self.staging_peak = max(self.staging_peak, self.staging_bytes())

    def _free_staging(self, later: bool = False) -> None:
        """Drop the staging buffers (unregistered); ``later``: the transport thread unregisters them
        (after the last commit, when it is idle), so no boundary pays it.

        Unregistered, not shrunk: a peer that starts the next update's first chunk before this rank
        registers its new staging (ranks begin at the same boundary, not the same instant) then
        waits for the registration, where a one-row stand-in would make it refuse the copies."""
        if not self._bufs:
            return
        n, self._bufs = len(self._bufs), []

        def unregister() -> None:
            for b in range(n):
                for name in self.weights:
                    self.transport.unregister(bg_staging_name(name, b))

        if later and self._threads is not None and self._threads.thread is not None:
            self._submit(unregister)
        else:
            unregister()

    def staging_bytes(self) -> int:
        """Bytes of background staging allocated now (``depth`` chunks during an update, 0 after)."""
        return sum(t.numel() * t.element_size() for bufs in self._bufs for t in bufs.values())

