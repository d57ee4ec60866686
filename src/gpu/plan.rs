//! A step's plan as the kernels read it: one array of u32 words (tokens, positions, cache slots,
//! attention plans, block tables, logit rows), laid out per step or, for decode graphs, at
//! addresses that depend on the padded batch size alone.

use super::runtime::{GpuError, Result};
use crate::backend::FlatBatch;

/// Where a step's plan parts start in the uploaded array.
#[derive(Clone, Copy)]
pub(super) struct PlanOffsets {
    pub tokens: usize,
    pub positions: usize,
    pub slots: usize,
    pub plans: usize,
    pub tables: usize,
    pub logit_rows: usize,
}

/// Attention plan per query token, as kernels/attention.cuh's `TokenPlan`.
const PLAN_WORDS: usize = 4;

/// Lays out a step's plan in `m`: tokens, positions, cache slots, attention plans (attention.cuh's
/// `TokenPlan` per token), block tables, logit rows. Returns where each part starts.
pub fn write_plan(batch: &FlatBatch, bs: usize, num_blocks: usize, m: &mut Vec<u32>) -> Result<[usize; 6]> {
    let n = batch.tokens.len();
    m.clear();
    let mut offsets = [0usize; 6];
    m.extend_from_slice(&batch.tokens);
    offsets[1] = m.len();
    m.extend_from_slice(&batch.positions);
    offsets[2] = m.len();
    for seq in &batch.seqs {
        for j in seq.context_len - seq.query_len..seq.context_len {
            let block = seq.block_table[j / bs];
            if block as usize >= num_blocks {
                return Err(GpuError(format!("block {block} of a step's table is outside the cache")));
            }
            m.push(block * bs as u32 + (j % bs) as u32);
        }
    }
    offsets[3] = m.len();
    let mut table_offset = 0usize;
    for seq in &batch.seqs {
        let (keep, size) = seq.window.map_or((0, 0), |w| (w.keep as u32, w.size as u32));
        for j in seq.context_len - seq.query_len..seq.context_len {
            m.extend_from_slice(&[j as u32, table_offset as u32, keep, size]);
        }
        table_offset += seq.block_table.len();
    }
    debug_assert_eq!(m.len() - offsets[3], n * PLAN_WORDS);
    offsets[4] = m.len();
    for seq in &batch.seqs {
        m.extend_from_slice(&seq.block_table);
    }
    offsets[5] = m.len();
    m.extend(batch.logit_rows.iter().map(|&r| r as u32));
    Ok(offsets)
}

/// The plan of a decode step padded to `padded` tokens, at addresses that depend on `padded`
/// alone (a graph bakes them in): tokens, positions, slots, plans, logit rows (`padded` rows
/// each, plans 4 words a token), then the block tables, the scratch block first. Padding
/// tokens decode token 0 at position 0 into the scratch block. None when a table entry is
/// released (windowed sequences; they run without graphs).
pub(super) fn graph_layout(
    batch: &FlatBatch,
    padded: usize,
    bs: usize,
    num_blocks: usize,
    m: &mut Vec<u32>,
) -> Result<Option<PlanOffsets>> {
    let n = batch.tokens.len();
    let o = PlanOffsets {
        tokens: 0,
        positions: padded,
        slots: 2 * padded,
        plans: 3 * padded,
        logit_rows: 7 * padded,
        tables: 8 * padded,
    };
    m.clear();
    m.resize(o.tables, 0);
    m.push(num_blocks as u32); // the scratch block
    let scratch_slot = (num_blocks * bs) as u32;
    for (t, seq) in batch.seqs.iter().enumerate() {
        let j = seq.context_len - 1;
        let block = seq.block_table[j / bs];
        if block as usize >= num_blocks || seq.window.is_some() {
            return Ok(None);
        }
        m[o.tokens + t] = batch.tokens[t];
        m[o.positions + t] = batch.positions[t];
        m[o.slots + t] = block * bs as u32 + (j % bs) as u32;
        let table = (m.len() - o.tables) as u32;
        m[o.plans + 4 * t..o.plans + 4 * t + 4].copy_from_slice(&[j as u32, table, 0, 0]);
        m[o.logit_rows + t] = t as u32;
        m.extend_from_slice(&seq.block_table);
    }
    for t in n..padded {
        m[o.slots + t] = scratch_slot;
        m[o.logit_rows + t] = t as u32;
    }
    Ok(Some(o))
}
