"""Records that one role's package hands to another's (the roles never import each other):
frozen dataclasses, which pickle through Ray and name their fields."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InsertAck:
    """A replay shard's answer to an insert: what it stored, and the totals an actor paces
    itself by (`actors.insert_pacer`)."""
    inserted: int  # transitions stored by this call, parked successors it released included
    total_inserted: int  # the shard's transitions over its life, a restored snapshot's too
    insert_budget: int  # transitions its rate limiter lets in now
    parked: bool = False  # the chunk came before its predecessor and waits for it
