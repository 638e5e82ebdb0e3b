"""The archive of searches: jobs, candidates, fronts and checkpoints in one SQLite file."""

from evomerge.store.archive import SCHEMA_VERSION, CandidateRow, Store, StoreError

__all__ = ["SCHEMA_VERSION", "CandidateRow", "Store", "StoreError"]
