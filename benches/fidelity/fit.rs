//! The fit of the simulator's step times to vLLM's runs.
//!
//! In a closed loop of c clients whose requests have P prompt tokens and O
//! out, X requests finish per second. Over a second the engine
//! runs X × O / c steps of c requests, X × P prefill tokens, and reads X ×
//! (O × P + O × (O − 1) / 2) tokens of context, so that
//!
//! ```text
//! 1000 / X = O / c × step_ms + O × step_ms_per_seq + P / 1000 × prefill_ms_per_1k
//!          + (O × P + O × (O − 1) / 2) / 1000 × step_ms_per_1k_context
//! ```
//!
//! Four sweeps give such equations, each weighing mostly on some of the
//! figures: *decode* (≈90-token prompts, 32 out, concurrency 1 to 64: the
//! throughput curve the table reports), *prefill* (≈490-token prompts, 4
//! out, concurrency 1, 4, 16), *long context* (≈490-token prompts, 96 out,
//! concurrency 4, 12) and *long output* (≈490-token prompts, 240 out,
//! concurrency 12). The fit is their least squares solution, each equation
//! weighed by its relative error. X is what the clients see, so whatever
//! vLLM's frontend adds to a request is in the figures too.

use super::{Results, Steps, SHAPES};

/// Step times fitted to vLLM's runs.
pub fn fit(runs: &[Results]) -> Steps {
    let mut rows = Vec::new();
    for r in runs {
        for (shape, outcomes) in SHAPES.iter().zip(&r.sweeps) {
            for (&(c, n), o) in shape.points.iter().zip(outcomes) {
                let (c, out, p) = (c as f64, shape.out as f64, o.mean_prompt());
                let context = out * p + out * (out - 1.0) / 2.0;
                let a = [out / c, out, p / 1000.0, context / 1000.0];
                rows.push((a, 1000.0 * o.wall / n as f64));
            }
        }
    }
    let x = least_squares(&rows);
    Steps {
        step: x[0].max(0.0),
        per_seq: x[1].max(0.0),
        prefill_per_1k: x[2].max(0.0),
        per_1k_context: x[3].max(0.0),
    }
}

/// The x minimising Σ ((a · x − y) / y)² over the rows (a, y).
fn least_squares<const N: usize>(rows: &[([f64; N], f64)]) -> [f64; N] {
    // The normal equations, solved by Gauss-Jordan elimination.
    let mut m = vec![vec![0.0f64; N + 1]; N];
    for (a, y) in rows {
        let w = 1.0 / (y * y);
        for i in 0..N {
            for j in 0..N {
                m[i][j] += w * a[i] * a[j];
            }
            m[i][N] += w * a[i] * y;
        }
    }
    for col in 0..N {
        let pivot = (col..N)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .unwrap();
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    std::array::from_fn(|i| m[i][N] / m[i][i])
}
