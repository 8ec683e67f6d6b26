"""Reading tensors straight from safetensors byte ranges into (possibly pinned) buffers.

One `readinto` per tensor: no intermediate copy, so a pinned destination is filled at disk or
page-cache speed with bounded extra memory.
"""

from __future__ import annotations

import torch

from tidecli.errors import TideError
from tidecli.model.checkpoint import DTYPES, TensorInfo


def torch_dtype(code: str) -> torch.dtype:
    return getattr(torch, DTYPES[code][1])


class ShardReader:
    """Keeps shard files open while many tensors are read from them."""

    def __init__(self) -> None:
        self._files: dict[str, object] = {}

    def _fh(self, info: TensorInfo):
        key = str(info.file)
        fh = self._files.get(key)
        if fh is None:
            try:
                fh = open(info.file, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise TideError(f"cannot open {info.file}: {exc.strerror or exc}",
                                "check that the checkpoint folder is readable") from exc
            self._files[key] = fh
        return fh

    def read_into(self, info: TensorInfo, out: torch.Tensor) -> None:
        """Fill `out` (CPU, contiguous, same byte size) with the raw bytes of `info`."""
        raw = out.view(torch.uint8).reshape(-1)
        if raw.numel() != info.nbytes:
            raise AssertionError(f"{info.name}: buffer of {raw.numel()} bytes for {info.nbytes}")
        fh = self._fh(info)
        view = memoryview(raw.numpy()).cast("B")
        fh.seek(info.begin)
        got = 0
        while got < info.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise TideError(f"{info.file.name} ended early while reading {info.name}",
                                "re-download this shard (it is truncated)")
            got += n

    def read(self, info: TensorInfo) -> torch.Tensor:
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        self.read_into(info, out)
        return out

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()  # type: ignore[attr-defined]
        self._files.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_finite(name: str, t: torch.Tensor, *, shard: str | None = None) -> None:
    """Refuse weights holding NaN or inf: they would poison every token that touches them.

    Refused rather than warned about: one such weight turns every later activation of the
    tokens routed through it into NaN, so the output would be garbage without another sign.
    """
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        where = shard or "the shard that holds it"
        raise TideError(f"{name} contains NaN or inf values",
                        f"the checkpoint is corrupt; re-download {where}")
