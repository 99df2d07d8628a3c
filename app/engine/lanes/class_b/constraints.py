"""Constraints of constrained beam search: transformers 4.x's beam_constraints.py, ported.

Pure Python (no torch). The behaviour is kept exactly, quirks included, because the beam
ranking depends on it: a stateful copy of a DisjunctiveConstraint shares its `current_seq`
list with the original (4.x aliases it), and a token that breaks an in-progress constraint
is not offered to the pending ones in the same step.
"""

from __future__ import annotations

from typing import Any


class PhrasalConstraint:
    """The token ids must appear in this order, contiguously."""

    def __init__(self, token_ids: list[int]) -> None:
        if not isinstance(token_ids, list) or not token_ids:
            raise ValueError(f"`token_ids` has to be a non-empty list, but is {token_ids}.")
        if any(not isinstance(t, int) or t < 0 for t in token_ids):
            raise ValueError(f"Each token id has to be a non-negative integer, got {token_ids}.")
        self.token_ids = token_ids
        self.seqlen = len(token_ids)
        self.fulfilled_idx = -1  # the index of the last fulfilled token
        self.completed = False

    def advance(self) -> int | None:
        return None if self.completed else self.token_ids[self.fulfilled_idx + 1]

    def does_advance(self, token_id: int) -> bool:
        return not self.completed and token_id == self.token_ids[self.fulfilled_idx + 1]

    def update(self, token_id: int) -> tuple[bool, bool, bool]:
        """(stepped, completed, reset)"""
        stepped = completed = reset = False
        if self.does_advance(token_id):
            self.fulfilled_idx += 1
            stepped = True
            completed = self.fulfilled_idx == self.seqlen - 1
            self.completed = completed
        else:
            reset = True
            self.reset()
        return stepped, completed, reset

    def reset(self) -> None:
        self.completed = False
        self.fulfilled_idx = 0  # as 4.x (the reset copy is discarded by ConstraintListState)

    def remaining(self) -> int:
        return self.seqlen - (self.fulfilled_idx + 1)

    def copy(self, stateful: bool = False) -> PhrasalConstraint:
        new = PhrasalConstraint(self.token_ids)
        if stateful:
            new.fulfilled_idx = self.fulfilled_idx
            new.completed = self.completed
        return new


class DisjunctiveTrie:
    """A trie of the alternatives; no alternative may be a prefix of another."""

    def __init__(self, nested_token_ids: list[list[int]]) -> None:
        self.max_height = max(len(one) for one in nested_token_ids)
        root: dict[int, Any] = {}
        for token_ids in nested_token_ids:
            level = root
            for token_id in token_ids:
                level = level.setdefault(token_id, {})
        if len(nested_token_ids) != self.count_leaves(root):
            raise ValueError(
                "Each list in `nested_token_ids` can't be a complete subset of another list, "
                f"but is {nested_token_ids}."
            )
        self.trie = root

    def next_tokens(self, current_seq: list[int]) -> list[int]:
        start = self.trie
        for token in current_seq:
            start = start[token]
        return list(start.keys())

    def reached_leaf(self, current_seq: list[int]) -> bool:
        return not self.next_tokens(current_seq)

    def count_leaves(self, root: dict[int, Any]) -> int:
        nodes = list(root.values())
        return 1 if not nodes else sum(self.count_leaves(n) for n in nodes)


class DisjunctiveConstraint:
    """One of several token sequences must appear."""

    def __init__(self, nested_token_ids: list[list[int]]) -> None:
        if not isinstance(nested_token_ids, list) or not nested_token_ids:
            raise ValueError(
                f"`nested_token_ids` has to be a non-empty list, not {nested_token_ids}."
            )
        if any(not isinstance(ids, list) or not ids for ids in nested_token_ids):
            raise ValueError(f"Each alternative has to be a non-empty list: {nested_token_ids}.")
        if any(not isinstance(t, int) or t < 0 for ids in nested_token_ids for t in ids):
            raise ValueError(f"Each token id has to be a non-negative int: {nested_token_ids}.")
        self.trie = DisjunctiveTrie(nested_token_ids)
        self.token_ids = nested_token_ids
        self.seqlen = self.trie.max_height
        self.current_seq: list[int] = []
        self.completed = False

    def advance(self) -> list[int] | None:
        return self.trie.next_tokens(self.current_seq) or None

    def does_advance(self, token_id: int) -> bool:
        return token_id in self.trie.next_tokens(self.current_seq)

    def update(self, token_id: int) -> tuple[bool, bool, bool]:
        stepped = reset = False
        if self.does_advance(token_id):
            self.current_seq.append(token_id)
            stepped = True
        else:
            reset = True
            self.reset()
        self.completed = self.trie.reached_leaf(self.current_seq)
        return stepped, self.completed, reset

    def reset(self) -> None:
        self.completed = False
        self.current_seq = []

    def remaining(self) -> int:
        return 0 if self.completed else self.seqlen - len(self.current_seq)

    def copy(self, stateful: bool = False) -> DisjunctiveConstraint:
        new = DisjunctiveConstraint(self.token_ids)
        if stateful:
            new.current_seq = self.current_seq  # shared, not copied: 4.x's behaviour
            new.completed = self.completed
        return new


Constraint = PhrasalConstraint | DisjunctiveConstraint


class ConstraintListState:
    """Progress of one hypothesis through all the constraints."""

    def __init__(self, constraints: list[Constraint]) -> None:
        self.constraints = constraints
        self.max_seqlen = max(c.seqlen for c in constraints)
        self.n_constraints = len(constraints)
        self.completed = False
        self.init_state()

    def init_state(self) -> None:
        self.complete_constraints: list[Constraint] = []
        self.inprogress_constraint: Constraint | None = None
        self.pending_constraints = [c.copy(stateful=False) for c in self.constraints]

    def get_bank(self) -> int:
        """How far along the constraints this hypothesis is (the bank it is ranked in)."""
        add = 0
        if self.inprogress_constraint:
            add += self.max_seqlen - self.inprogress_constraint.remaining()
        return len(self.complete_constraints) * self.max_seqlen + add

    def advance(self) -> list[int] | None:
        """The tokens that would make progress from here."""
        token_list: list[int] = []
        sources = (
            self.pending_constraints
            if self.inprogress_constraint is None
            else [self.inprogress_constraint]
        )
        for constraint in sources:
            advance = constraint.advance()
            if isinstance(advance, int):
                token_list.append(advance)
            elif isinstance(advance, list):
                token_list.extend(advance)
        return token_list or None

    def reset(self, token_ids: list[int] | None) -> None:
        self.init_state()
        if token_ids is not None:
            for token in token_ids:
                self.add(token)
                if self.completed:
                    break

    def add(self, token_id: int) -> tuple[bool, bool]:
        """(complete, stepped)"""
        complete, stepped = False, False
        if self.completed:
            return True, False
        if self.inprogress_constraint is not None:
            stepped, complete, reset = self.inprogress_constraint.update(token_id)
            if reset:
                self.pending_constraints.append(self.inprogress_constraint.copy(stateful=False))
                self.inprogress_constraint = None
            if complete:
                self.complete_constraints.append(self.inprogress_constraint)  # type: ignore[arg-type]
                self.inprogress_constraint = None
                if not self.pending_constraints:
                    self.completed = True
        else:
            for cidx, pending in enumerate(self.pending_constraints):
                if pending.does_advance(token_id):
                    stepped, complete, _ = pending.update(token_id)
                    if complete:
                        self.complete_constraints.append(pending)
                        self.inprogress_constraint = None
                    if not complete and stepped:
                        self.inprogress_constraint = pending
                    if complete or stepped:
                        pending_list = self.pending_constraints
                        self.pending_constraints = pending_list[:cidx] + pending_list[cidx + 1 :]
                        if not self.pending_constraints and self.inprogress_constraint is None:
                            self.completed = True
                        break
        return complete, stepped

    def copy(self, stateful: bool = True) -> ConstraintListState:
        new = ConstraintListState(self.constraints)
        if stateful:
            new.complete_constraints = [c.copy(stateful=True) for c in self.complete_constraints]
            if self.inprogress_constraint is not None:
                new.inprogress_constraint = self.inprogress_constraint.copy(stateful=True)
            new.pending_constraints = [c.copy() for c in self.pending_constraints]
        return new


def build_constraint(spec: dict[str, Any]) -> Constraint:
    """A constraint from its JSON form (see options.py): phrasal or disjunctive."""
    if spec["type"] == "phrasal":
        return PhrasalConstraint(list(spec["token_ids"]))
    return DisjunctiveConstraint([list(ids) for ids in spec["nested_token_ids"]])
