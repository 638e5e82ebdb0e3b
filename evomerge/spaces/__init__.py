"""Search spaces: how a genome (a flat real vector with named genes) decodes to a recipe."""

from evomerge.spaces.dataflow import DataflowSpace, SourceSizes, source_sizes

__all__ = ["DataflowSpace", "SourceSizes", "source_sizes"]
