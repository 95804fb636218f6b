"""Where AuxK looks: the dead latents of each local expert, as a short padded list of candidate columns.

AuxK (Gao et al.) reconstructs the residual from the top k_aux = d/2 pre-activations among dead latents. Masking
all M_e columns and selecting k_aux of them costs a wide TopK on every token, and a backward over k + k_aux rows,
even when no latent is dead. Here the selection runs over candidate columns only, and not at all until a latent
can be dead.

`DeadCandidates` chooses the candidates of each training step without reading the device: it cannot know how many
latents are dead now without waiting for the previous step, so it uses the latents that were *close* to dead two
steps ago (a superset, since a counter grows by at most one batch per step) to size the candidate list, a count
it copied to the host a whole step earlier; the list itself is made from the dead latents of now.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch
from torch import Tensor


class AuxCandidates(NamedTuple):
    """Per local expert, C candidate columns (latent index within the expert) and which of them are dead now."""

    ids_NC: Tensor
    """long [N_local, C]; padding repeats columns that are not candidates (never dead)."""
    dead_NC: Tensor
    """bool [N_local, C]: the candidate is dead now (False for padding)."""


def candidates_of_width(dead_NM: Tensor, width: int) -> AuxCandidates:
    """Each expert's dead columns in column order, then other columns up to `width` (not dead: padding).

    Covers every dead latent when `width` >= the largest number of dead latents of an expert. The dead columns come
    first whatever the width, so (with AuxK's sorted TopK) the selection does not depend on the width.
    """
    order_NM = torch.argsort((~dead_NM).to(torch.uint8), dim=1, stable=True)
    ids_NC = order_NM[:, :width]
    return AuxCandidates(ids_NC, dead_NM.gather(1, ids_NC))


def dead_candidates(dead_mask_L: Tensor, num_local_experts: int) -> AuxCandidates:
    """Exactly the dead latents of `dead_mask_L` [N_local * M_e] (reads their count back to the host)."""
    dead_NM = dead_mask_L.view(num_local_experts, -1)
    return candidates_of_width(dead_NM, _most_dead(dead_NM))


def _most_dead(dead_NM: Tensor) -> int:
    return int(dead_NM.sum(1).max()) if dead_NM.numel() else 0


def power_of_two_at_least(width: int) -> int:
    """The smallest power of two >= `width` (0 for 0)."""
    return 0 if width == 0 else 1 << (width - 1).bit_length()


class _HostCount:
    """A device integer on its way to the host: copied without blocking, read (waiting if needed) later."""

    def __init__(self, value: Tensor):
        self.event = None
        if value.device.type == "cuda":
            self.host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self.host.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = value

    def read(self) -> int:
        if self.event is not None:
            self.event.synchronize()
        return int(self.host)


class DeadCandidates:
    """AuxK candidates for each training step, chosen without waiting for the device.

    After every step's dead-counter update, `after_update` counts the latents that may be dead one step later
    (counter >= dead_tokens - batch) and starts copying the largest per-expert count to the host. `for_step` sizes
    its list by the count made two updates ago, whose copy has had a whole step to arrive: every latent dead now
    was counted then. Until a counter can have reached `dead_tokens` (a host-side bound, so every rank decides alike), it
    returns None and AuxK does not run.
    """

    def __init__(self, num_local_experts: int, dead_tokens: int, batch_tokens: int, tokens_seen: int,
                 round_width: bool = False):
        self.num_local_experts = num_local_experts
        self.round_width = round_width
        """Pad the list to a power of two (few distinct widths: each is a CUDA graph of the step)."""
        self.dead_tokens = dead_tokens
        self.batch_tokens = batch_tokens
        self.max_counter = tokens_seen
        """An upper bound on every counter: the tokens seen since training began."""
        self._marks: deque[_HostCount | None] = deque(maxlen=2)
        """Per update, the largest number of possibly-dead latents of one expert, on its way to the host."""

    def for_step(self, tokens_since_fired_L: Tensor) -> AuxCandidates | None:
        """Candidates for the step about to run, or None while no latent can be dead."""
        if self.max_counter < self.dead_tokens:
            return None
        dead_NM = (tokens_since_fired_L >= self.dead_tokens).view(self.num_local_experts, -1)
        if len(self._marks) < 2 or self._marks[0] is None:  # just started or resumed: count now, once
            width = _most_dead(dead_NM)
        else:
            width = self._marks[0].read()
        if self.round_width:
            width = min(power_of_two_at_least(width), dead_NM.shape[1])
        return candidates_of_width(dead_NM, width)

    def after_update(self, tokens_since_fired_L: Tensor) -> None:
        """Record, after this step's counter update, which latents the step after next may find dead."""
        self.max_counter += self.batch_tokens
        if self.max_counter + self.batch_tokens < self.dead_tokens:
            self._marks.append(None)
            return
        possible_NM = (tokens_since_fired_L >= self.dead_tokens - self.batch_tokens).view(self.num_local_experts, -1)
        self._marks.append(_HostCount(possible_NM.sum(1).max()))
