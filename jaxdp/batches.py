"""Drawn privacy units to padded physical batches of fixed shape, on the mesh."""

from __future__ import annotations

import logging
import math

import numpy as np

from jaxdp import data, sampling, sharding
from jaxdp.plan import PrivacyPlan

log = logging.getLogger("jaxdp")


class BatchMaker:
    """Drawn privacy units -> padded physical batches of fixed shape, sharded over the mesh.

    Physical batches hold whole microbatches (`engine.microbatch_size` rows per device). A unit
    of several rows (a record cut into blocks, a user's records, or a micro-batch clipping
    cell) has its rows in one microbatch, with `segment_ids` naming the unit; rows shorter than
    the block carry a `token_mask`."""

    def __init__(self, plan: PrivacyPlan, engine, mesh, rows: data.UnitRows, physical=None):
        self.mesh, self.rows = mesh, rows
        self.micro = (engine.microbatch_size or 1) * mesh.size
        if plan.enabled and plan.sampling == "poisson":
            default = sampling.default_physical_batch_size(
                plan.expected_batch_size, plan.num_examples, self.micro, rows.counts
            )
        else:
            default = int(round(plan.expected_batch_size)) * rows.cap
        self.size = int(math.ceil((physical or default) / self.micro) * self.micro)
        self.units = None  # the clipping unit of every row, when units have several rows
        if plan.enabled and plan.group_size > 1:
            self.units = sampling.content_cells(rows.tokens, plan.num_cells)
        elif plan.enabled and rows.several_rows:
            self.units = rows.unit_of_row

    def physical(self, units: np.ndarray):
        rows = self.rows.rows_of(units)
        if self.units is None:
            chunks = [(r, pad, None) for r, pad in sampling.pad_batches(rows, self.size)]
        else:
            packed, dropped = sampling.pack_units(rows, self.units[rows], self.size, self.micro)
            if dropped:
                log.warning("%d drawn rows beyond a microbatch per unit were left out.", dropped)
            chunks = [(b.rows, b.is_padding, b.segment_ids) for b in packed]
        for r, is_padding, segment_ids in chunks:
            yield put_rows(self.rows, r, is_padding, self.mesh, segment_ids)


def put_rows(rows: data.UnitRows, r: np.ndarray, is_padding, mesh, segment_ids=None):
    """The physical batch of rows `r` (tokens, padding, token mask, segments) on the mesh."""
    batch = sharding.global_batch({"tokens": rows.tokens}, r, mesh)
    per_row = {"is_padding": is_padding}
    if rows.padded:
        per_row["token_mask"] = rows.token_mask(r)  # [P, T], for these rows only
    if segment_ids is not None:
        per_row["segment_ids"] = segment_ids
    batch.update(sharding.global_batch(per_row, np.arange(len(r)), mesh))
    return batch
