"""The rows of the one prefixed decoder pass that matching (MiCo Eq. 5) and caption generation
(Eq. 6) share: one parameter gather of the LLM under ZeRO-3 instead of two.

Each objective adds its rows under a name; the pass runs on their concatenation and each objective
reads its own hidden states back by name, never by position arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecoderRows:
    """Prefix embeddings, token ids and masks of named groups of rows, in the order added.

    Shapes: prefix (R, P, H), ids / mask (R, L) once :meth:`stack` ran; R = rows of every group.
    """

    groups: dict[str, slice] = field(default_factory=dict)
    _prefix: list[torch.Tensor] = field(default_factory=list)
    _ids: list[torch.Tensor] = field(default_factory=list)
    _mask: list[torch.Tensor] = field(default_factory=list)

    def add(self, name: str, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Append the rows of group ``name`` (prefix (n, P, H), ids / mask (n, L)); one call per part
        of the group, the group's rows stay contiguous."""
        start = sum(t.shape[0] for t in self._ids)
        if name in self.groups and self.groups[name].stop != start:
            raise ValueError(f"decoder rows of {name!r} must be added one after another")
        begin = self.groups[name].start if name in self.groups else start
        self.groups[name] = slice(begin, start + ids.shape[0])
        self._prefix.append(prefix)
        self._ids.append(ids)
        self._mask.append(mask)

    def __contains__(self, name: str) -> bool:
        return name in self.groups

    def __bool__(self) -> bool:
        return bool(self.groups)

    def stack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prefix (R, P, H), ids (R, L), mask (R, L)) of every row."""
        return torch.cat(self._prefix), torch.cat(self._ids), torch.cat(self._mask)

    def take(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The rows of group ``name`` of a tensor computed over all rows (first dim R)."""
        return x[self.groups[name]]
