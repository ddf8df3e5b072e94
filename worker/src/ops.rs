//! Fused CPU kernels with hand-written backward passes, as candle custom ops.
//!
//! candle 0.11 builds softmax, RMSNorm and rotary embeddings out of elementwise ops, so the
//! backward pass walks and materialises every intermediate (softmax's backward alone measured
//! ~6x its forward), and candle's elementwise CPU kernels run on one thread. Each op here is one
//! pass over its rows forward and one backward, with rows split over the current rayon pool.
//! Every output element is computed by the same sequential code whatever the thread count, so
//! results stay bit-identical across `--threads`.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, InplaceOp1, Layout, Result, Shape, Tensor, bail,
};
use rayon::prelude::*;

/// Rows handed to one rayon task: enough work to amortise the task, few enough to balance.
const ROWS_PER_TASK: usize = 16;

/// The contiguous f32 elements of a CPU tensor argument.
pub(crate) fn f32s<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { bail!("{op}: expects an f32 tensor") };
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: expects a contiguous tensor") };
    Ok(&data[start..end])
}

/// The contiguous f32 elements of a CPU tensor, mutably (an in-place op's target).
fn f32s_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else { bail!("{op}: expects an f32 tensor") };
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("{op}: expects a contiguous tensor") };
    Ok(&mut data[start..end])
}

/// Copies little-endian f32 `bytes` over bytes `[offset, offset + bytes.len())` of `dst` (a
/// piece of a checkpoint restored in place). `None`, with nothing written, if the range does not
/// fit. Little-endian hosts only (checked at compile time by the checkpoint store).
pub(crate) fn overwrite_bytes(dst: &mut [f32], offset: usize, bytes: &[u8]) -> Option<()> {
    let range = bytemuck::cast_slice_mut::<f32, u8>(dst).get_mut(offset..offset.checked_add(bytes.len())?)?;
    range.copy_from_slice(bytes);
    Some(())
}

/// Overwrites bytes `[offset, offset + len)` of an f32 tensor's storage in place with
/// little-endian f32 bytes (a piece of a checkpoint restored into a live model: no allocation,
/// one copy). The range must fit the tensor.
pub(crate) struct OverwriteF32<'a> {
    /// Byte offset into the tensor.
    pub offset: usize,
    /// The bytes.
    pub bytes: &'a [u8],
}

impl InplaceOp1 for OverwriteF32<'_> {
    fn name(&self) -> &'static str {
        "overwrite-f32"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let dst = f32s_mut(storage, layout, "overwrite-f32")?;
        let len = std::mem::size_of_val(dst);
        if overwrite_bytes(dst, self.offset, self.bytes).is_none() {
            bail!("overwrite-f32: bytes {}..+{} of a {len}-byte tensor", self.offset, self.bytes.len());
        }
        Ok(())
    }
}

/// The last dimension of a shape and the number of rows before it.
fn rows_cols(shape: &Shape, op: &str) -> Result<(usize, usize)> {
    let Some(&cols) = shape.dims().last() else { bail!("{op}: expects at least one dimension") };
    if cols == 0 {
        bail!("{op}: empty last dimension");
    }
    Ok((shape.elem_count() / cols, cols))
}

// ---------------------------------------------------------------------------------------------
// Linear layer: x · wᵀ with faer kernels.

/// Rows of the output computed by one rayon task of [`linear`] (each task runs faer
/// single-threaded on its rows, so every element's sum runs in the same order whatever the
/// thread count).
const LINEAR_ROWS_PER_TASK: usize = 64;

/// `dst[rows, cols] = lhs · rhs`, row blocks in parallel, each single-threaded.
fn matmul_rows(dst: &mut [f32], cols: usize, lhs: faer::MatRef<'_, f32>, rhs: faer::MatRef<'_, f32>) {
    dst.par_chunks_mut(LINEAR_ROWS_PER_TASK * cols).enumerate().for_each(|(i, block)| {
        let first = i * LINEAR_ROWS_PER_TASK;
        let rows = block.len() / cols;
        let out = faer::MatMut::from_row_major_slice_mut(block, rows, cols);
        let lhs = lhs.subrows(first, rows);
        faer::linalg::matmul::matmul(out, faer::Accum::Replace, lhs, rhs, 1.0f32, faer::Par::Seq);
    });
}

/// A row-major slice as a faer matrix view (no copy).
pub(crate) fn row_major(values: &[f32], rows: usize, cols: usize) -> faer::MatRef<'_, f32> {
    faer::MatRef::from_row_major_slice(values, rows, cols)
}

/// The values of a contiguous f32 CPU tensor, copied.
pub(crate) fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(xs, xl, "linear")?, f32s(ws, wl, "linear")?);
        let (n, k) = xl.shape().dims2()?;
        let (o, wk) = wl.shape().dims2()?;
        if wk != k {
            bail!("linear: input of {k} features, weight of {wk}");
        }
        let mut out = vec![0.0f32; n * o];
        matmul_rows(&mut out, o, row_major(x, n, k), row_major(w, o, k).transpose());
        Ok((CpuStorage::F32(out), Shape::from((n, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = x.dims2()?;
        let (o, _) = w.dims2()?;
        let (xv, wv, dyv) = (host_values(x)?, host_values(w)?, host_values(dy)?);
        let dym = row_major(&dyv, n, o);
        // dx = dy · w, and dw = dyᵀ · x: row blocks of each output, so no sum is split.
        let mut dx = vec![0.0f32; n * k];
        matmul_rows(&mut dx, k, dym, row_major(&wv, o, k));
        let mut dw = vec![0.0f32; o * k];
        matmul_rows(&mut dw, k, dym.transpose(), row_major(&xv, n, k));
        Ok((Some(Tensor::from_vec(dx, (n, k), x.device())?), Some(Tensor::from_vec(dw, (o, k), w.device())?)))
    }
}

/// A linear layer without bias: `x · wᵀ` for `x [n, in]` and `w [out, in]`, with faer's GEMM
/// (faster than candle's on these shapes) and its own backward.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

// ---------------------------------------------------------------------------------------------
// Batched matmul (attention): one faer GEMM per batch entry, entries in parallel.

/// `c[i] = a[i] · b[i]` (or `a[i] · b[i]ᵀ` when `b_transposed`) for `a [B, m, k]`.
struct BatchedMatmul {
    b_transposed: bool,
}

/// `(batch, rows, cols)` of a 3-D shape.
fn dims3(shape: &Shape) -> Result<(usize, usize, usize)> {
    shape.dims3()
}

/// `out[i] = lhs[i] · rhs[i]` with each operand optionally transposed, batch entries in parallel.
#[allow(clippy::too_many_arguments)] // two matrices, their shapes and orientations
fn batched(
    out: &mut [f32],
    (m, n): (usize, usize),
    lhs: &[f32],
    (lr, lc, lt): (usize, usize, bool),
    rhs: &[f32],
    (rr, rc, rt): (usize, usize, bool),
) {
    out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
        let l = row_major(&lhs[i * lr * lc..(i + 1) * lr * lc], lr, lc);
        let r = row_major(&rhs[i * rr * rc..(i + 1) * rr * rc], rr, rc);
        let (l, r) = (if lt { l.transpose() } else { l }, if rt { r.transpose() } else { r });
        let c = faer::MatMut::from_row_major_slice_mut(c, m, n);
        faer::linalg::matmul::matmul(c, faer::Accum::Replace, l, r, 1.0f32, faer::Par::Seq);
    });
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32s(as_, al, "batched-matmul")?, f32s(bs, bl, "batched-matmul")?);
        let (batch, m, k) = dims3(al.shape())?;
        let (bb, br, bc) = dims3(bl.shape())?;
        let (kb, n) = if self.b_transposed { (bc, br) } else { (br, bc) };
        if bb != batch || kb != k {
            bail!("batched-matmul: {:?} times {:?}", al.dims(), bl.dims());
        }
        let mut out = vec![0.0f32; batch * m * n];
        batched(&mut out, (m, n), a, (m, k, false), b, (br, bc, self.b_transposed));
        Ok((CpuStorage::F32(out), Shape::from((batch, m, n))))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dc: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (batch, m, k) = a.dims3()?;
        let (_, br, bc) = b.dims3()?;
        let n = if self.b_transposed { br } else { bc };
        let (av, bv, dcv) = (host_values(a)?, host_values(b)?, host_values(dc)?);
        let mut da = vec![0.0f32; batch * m * k];
        let mut db = vec![0.0f32; batch * br * bc];
        if self.b_transposed {
            // c = a · bᵀ: da = dc · b, db = dcᵀ · a.
            batched(&mut da, (m, k), &dcv, (m, n, false), &bv, (br, bc, false));
            batched(&mut db, (br, bc), &dcv, (m, n, true), &av, (m, k, false));
        } else {
            // c = a · b: da = dc · bᵀ, db = aᵀ · dc.
            batched(&mut da, (m, k), &dcv, (m, n, false), &bv, (br, bc, true));
            batched(&mut db, (br, bc), &av, (m, k, true), &dcv, (m, n, false));
        }
        Ok((
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `a · b` (or `a · bᵀ` when `b_transposed`) over the leading dimensions of two 4-D tensors
/// (`[batch, heads, m, k]`), with faer kernels and its own backward.
pub fn batched_matmul(a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Tensor> {
    let (d0, d1, m, _) = a.dims4()?;
    let flat = |t: &Tensor| -> Result<Tensor> {
        let (x, y, r, c) = t.dims4()?;
        t.contiguous()?.reshape((x * y, r, c))
    };
    let c = flat(a)?.apply_op2(&flat(b)?, BatchedMatmul { b_transposed })?;
    let n = c.dim(2)?;
    c.reshape((d0, d1, m, n))
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension, optionally scaled and causally masked.

/// `softmax(scale * x)` over the last dimension. With `causal`, the input is `[.., t, t]`
/// attention scores and key `j` of query `i` is masked (probability exactly 0) when `j > i`,
/// without reading or exponentiating the masked scores.
#[derive(Clone, Copy, Debug)]
struct Softmax {
    scale: f32,
    causal: bool,
}

impl Softmax {
    /// Keys row `r` may attend to.
    fn valid(&self, r: usize, cols: usize) -> usize {
        if self.causal { (r % cols) + 1 } else { cols }
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(storage, layout, self.name())?;
        let (rows, cols) = rows_cols(layout.shape(), self.name())?;
        let dims = layout.shape().dims();
        if self.causal && (dims.len() < 2 || dims[dims.len() - 2] != cols) {
            bail!("causal softmax expects [.., t, t] scores, got {:?}", layout.shape());
        }
        let mut y = vec![0f32; rows * cols];
        let op = *self;
        y.par_chunks_mut(cols * ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
            for (i, out) in out.chunks_mut(cols).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let valid = op.valid(r, cols);
                let row = &x[r * cols..r * cols + valid];
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * op.scale));
                let mut sum = 0f32;
                for (o, &v) in out[..valid].iter_mut().zip(row) {
                    let e = (v * op.scale - max).exp();
                    *o = e;
                    sum += e;
                }
                out[..valid].iter_mut().for_each(|o| *o /= sum);
                // The rest stays 0: masked keys get exactly zero probability.
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = res.apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxBackward(*self))?;
        Ok(Some(grad))
    }
}

/// `dx = scale * y * (dy - Σ dy·y)` per row, from the softmax output `y` and its gradient `dy`.
struct SoftmaxBackward(Softmax);

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32s(ys, yl, self.name())?;
        let dy = f32s(dys, dyl, self.name())?;
        if yl.shape() != dyl.shape() {
            bail!("{}: shapes {:?} and {:?} differ", self.name(), yl.shape(), dyl.shape());
        }
        let (rows, cols) = rows_cols(yl.shape(), self.name())?;
        let op = self.0;
        let mut dx = vec![0f32; rows * cols];
        dx.par_chunks_mut(cols * ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
            for (i, out) in out.chunks_mut(cols).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let valid = op.valid(r, cols);
                let (yr, dyr) = (&y[r * cols..r * cols + valid], &dy[r * cols..r * cols + valid]);
                let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
                for ((o, &yv), &g) in out[..valid].iter_mut().zip(yr).zip(dyr) {
                    *o = op.scale * yv * (g - dot);
                }
            }
        });
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

/// Softmax of `scale * scores` over the last dimension of `[.., t, t]` attention scores with a
/// causal mask, fused (one pass forward, one backward).
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(Softmax { scale: scale as f32, causal: true })
}

/// Softmax over the last dimension, fused (one pass forward, one backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax { scale: 1.0, causal: false })
}

// ---------------------------------------------------------------------------------------------
// RMSNorm.

/// `y = x / sqrt(mean(x²) + eps) * gain` over the last dimension.
struct RmsNorm {
    eps: f32,
}

/// The reciprocal RMS of a row.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(xs, xl, self.name())?;
        let g = f32s(gs, gl, self.name())?;
        let (rows, cols) = rows_cols(xl.shape(), self.name())?;
        if g.len() != cols {
            bail!("{}: gain has {} elements, rows have {cols}", self.name(), g.len());
        }
        let eps = self.eps;
        let mut y = vec![0f32; rows * cols];
        y.par_chunks_mut(cols * ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
            for (i, out) in out.chunks_mut(cols).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let row = &x[r * cols..(r + 1) * cols];
                let inv = inv_rms(row, eps);
                for ((o, &v), &gv) in out.iter_mut().zip(row).zip(g) {
                    *o = v * inv * gv;
                }
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gain: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let cols = x.dim(candle_core::D::Minus1)?;
        let n = x.elem_count();
        // One output buffer: dx (n elements) then dgain (cols elements).
        let both = x.contiguous()?.apply_op3_no_bwd(
            &gain.contiguous()?,
            &grad.contiguous()?,
            &RmsNormBackward { eps: self.eps },
        )?;
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgain = both.narrow(0, n, cols)?.reshape(gain.shape())?;
        Ok((Some(dx), Some(dgain)))
    }
}

/// RMSNorm's backward: `dx = r·(dy·g − x̂·mean(dy·g·x̂))`, `dg = Σ_rows dy·x̂` (x̂ = x·r), as one
/// flat buffer `[dx…, dg…]`.
struct RmsNormBackward {
    eps: f32,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(xs, xl, self.name())?;
        let g = f32s(gs, gl, self.name())?;
        let dy = f32s(dys, dyl, self.name())?;
        let (rows, cols) = rows_cols(xl.shape(), self.name())?;
        if g.len() != cols || dy.len() != x.len() {
            bail!("{}: mismatched shapes", self.name());
        }
        let eps = self.eps;
        let mut out = vec![0f32; rows * cols + cols];
        let (dx, dg) = out.split_at_mut(rows * cols);
        dx.par_chunks_mut(cols * ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
            for (i, out) in out.chunks_mut(cols).enumerate() {
                let r = task * ROWS_PER_TASK + i;
                let (row, dyr) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
                let inv = inv_rms(row, eps);
                let dot: f32 = row.iter().zip(dyr).zip(g).map(|((&v, &d), &gv)| d * gv * v * inv).sum();
                let c = dot / cols as f32;
                for (((o, &v), &d), &gv) in out.iter_mut().zip(row).zip(dyr).zip(g) {
                    *o = inv * (d * gv - v * inv * c);
                }
            }
        });
        // The gain's gradient sums over rows in row order (sequential: deterministic).
        for r in 0..rows {
            let (row, dyr) = (&x[r * cols..(r + 1) * cols], &dy[r * cols..(r + 1) * cols]);
            let inv = inv_rms(row, eps);
            for ((acc, &v), &d) in dg.iter_mut().zip(row).zip(dyr) {
                *acc += d * v * inv;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(rows * cols + cols)))
    }
}

/// RMSNorm over the last dimension with a learned gain, fused.
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&gain.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding fused with the split into heads.

/// Rotary tables: `cos`/`sin` of every position and frequency, `[t, head_dim / 2]` row-major.
#[derive(Clone, Debug)]
pub struct RopeTables {
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
    half: usize,
}

impl RopeTables {
    /// Tables for `positions` positions and heads of `head_dim` (even) with base `theta`
    /// (half-split convention: frequency `i` rotates the pair `(i, i + head_dim / 2)`).
    pub fn new(positions: usize, head_dim: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for pos in 0..positions {
            for i in 0..half {
                let freq = theta.powf(-(2.0 * i as f64) / (2.0 * half as f64));
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { cos: cos.into(), sin: sin.into(), half }
    }
}

/// `[b, t, heads·hd]` → rotated `[b, heads, t, hd]` (`inverse == false`), or a gradient
/// `[b, heads, t, hd]` → `[b, t, heads·hd]` rotated back (`inverse == true`, the backward).
#[derive(Clone)]
struct RopeHeads {
    tables: RopeTables,
    heads: usize,
    inverse: bool,
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "fused-rope-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(storage, layout, self.name())?;
        let half = self.tables.half;
        let hd = 2 * half;
        let nh = self.heads;
        let (cos, sin) = (&self.tables.cos[..], &self.tables.sin[..]);
        if !self.inverse {
            let (b, t, h) = layout.shape().dims3()?;
            if h != nh * hd || t * half > cos.len() {
                bail!("{}: input {:?} does not fit {nh} heads of {hd}", self.name(), layout.shape());
            }
            let mut y = vec![0f32; x.len()];
            // One task per (batch, head): a contiguous [t, hd] block of the output.
            y.par_chunks_mut(t * hd).enumerate().for_each(|(bh, out)| {
                let (bi, head) = (bh / nh, bh % nh);
                for (pos, o) in out.chunks_mut(hd).enumerate() {
                    let src = &x[(bi * t + pos) * h + head * hd..][..hd];
                    let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                    rotate(src, o, c, s, false);
                }
            });
            Ok((CpuStorage::F32(y), Shape::from((b, nh, t, hd))))
        } else {
            let (b, heads, t, d) = layout.shape().dims4()?;
            if heads != nh || d != hd || t * half > cos.len() {
                bail!("{}: gradient {:?} does not fit {nh} heads of {hd}", self.name(), layout.shape());
            }
            let h = nh * hd;
            let mut dx = vec![0f32; x.len()];
            // One task per token row of the output.
            dx.par_chunks_mut(h * ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
                for (i, o) in out.chunks_mut(h).enumerate() {
                    let row = task * ROWS_PER_TASK + i;
                    let (bi, pos) = (row / t, row % t);
                    let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                    for head in 0..nh {
                        let g = &x[((bi * nh + head) * t + pos) * hd..][..hd];
                        rotate(g, &mut o[head * hd..][..hd], c, s, true);
                    }
                }
            });
            Ok((CpuStorage::F32(dx), Shape::from((b, t, h))))
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let back = RopeHeads { inverse: true, ..self.clone() };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// Rotates the half-split pairs `(x1, x2)` of one head vector by the angles with cosines `c` and
/// sines `s`: `(x1·c − x2·s, x1·s + x2·c)`, or back by the negated angles with `inverse`.
fn rotate(x: &[f32], out: &mut [f32], c: &[f32], s: &[f32], inverse: bool) {
    let half = c.len();
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    let pairs = o1.iter_mut().zip(o2.iter_mut()).zip(x1.iter().zip(x2)).zip(c.iter().zip(s));
    for (((o1, o2), (&a, &b)), (&c, &s)) in pairs {
        if inverse {
            *o1 = a * c + b * s;
            *o2 = b * c - a * s;
        } else {
            *o1 = a * c - b * s;
            *o2 = a * s + b * c;
        }
    }
}

/// Splits `[b, t, heads·hd]` projections into `[b, heads, t, hd]` heads with rotary position
/// embedding applied (`x1·cos − x2·sin`, `x1·sin + x2·cos` on the two halves), fused.
pub fn rope_heads(x: &Tensor, tables: &RopeTables, heads: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RopeHeads { tables: tables.clone(), heads, inverse: false })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use candle_core::{D, Device, Var};

    use super::*;

    fn seq(n: usize, mul: f32) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * mul).collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Value and gradient (of `sum(out * w)`) of a fused op against its composed reference.
    fn check(inputs: &[Var], fused: impl Fn(&[Tensor]) -> Tensor, reference: impl Fn(&[Tensor]) -> Tensor) {
        let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (a, b) = (fused(&xs), reference(&xs));
        assert!(max_diff(&a, &b) < 1e-5, "forward differs by {}", max_diff(&a, &b));
        let w = Tensor::from_vec(seq(a.elem_count(), 1.0), a.shape(), &Device::Cpu).unwrap();
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for v in inputs {
            let (x, y) = (ga.get(v.as_tensor()).unwrap(), gb.get(v.as_tensor()).unwrap());
            assert!(max_diff(x, y) < 1e-5, "gradient differs by {}", max_diff(x, y));
        }
    }

    #[test]
    fn linear_matches_matmul_and_its_gradients() {
        // More rows than one task takes, so the row blocks are exercised.
        let x = Var::from_vec(seq(150 * 7, 1.0), (150, 7), &Device::Cpu).unwrap();
        let w = Var::from_vec(seq(5 * 7, 0.5), (5, 7), &Device::Cpu).unwrap();
        check(&[x, w], |xs| linear(&xs[0], &xs[1]).unwrap(), |xs| xs[0].matmul(&xs[1].t().unwrap()).unwrap());
    }

    #[test]
    fn batched_matmul_matches_matmul_and_its_gradients() {
        let a = Var::from_vec(seq(2 * 3 * 5 * 4, 1.0), (2, 3, 5, 4), &Device::Cpu).unwrap();
        let b = Var::from_vec(seq(2 * 3 * 4 * 6, 0.5), (2, 3, 4, 6), &Device::Cpu).unwrap();
        check(
            &[a.clone(), b],
            |xs| batched_matmul(&xs[0], &xs[1], false).unwrap(),
            |xs| xs[0].matmul(&xs[1]).unwrap(),
        );
        let bt = Var::from_vec(seq(2 * 3 * 6 * 4, 0.5), (2, 3, 6, 4), &Device::Cpu).unwrap();
        check(
            &[a, bt],
            |xs| batched_matmul(&xs[0], &xs[1], true).unwrap(),
            |xs| xs[0].matmul(&xs[1].t().unwrap()).unwrap(),
        );
    }

    #[test]
    fn causal_softmax_matches_the_composed_softmax_and_its_gradient() {
        let t = 7;
        let x = Var::from_vec(seq(2 * 3 * t * t, 3.0), (2, 3, t, t), &Device::Cpu).unwrap();
        let mask: Vec<f32> = (0..t * t).map(|i| if i % t <= i / t { 0.0 } else { -1e9 }).collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        check(
            &[x],
            |xs| causal_softmax(&xs[0], 0.5).unwrap(),
            |xs| {
                candle_nn::ops::softmax(&(&xs[0] * 0.5).unwrap().broadcast_add(&mask).unwrap(), D::Minus1)
                    .unwrap()
            },
        );
    }

    #[test]
    fn softmax_matches_the_composed_softmax_and_its_gradient() {
        let x = Var::from_vec(seq(40 * 9, 4.0), (40, 9), &Device::Cpu).unwrap();
        check(
            &[x],
            |xs| softmax_last_dim(&xs[0]).unwrap(),
            |xs| candle_nn::ops::softmax(&xs[0], D::Minus1).unwrap(),
        );
    }

    #[test]
    fn rms_norm_matches_the_composed_norm_and_its_gradients() {
        let x = Var::from_vec(seq(37 * 12, 2.0), (37, 12), &Device::Cpu).unwrap();
        let g = Var::from_vec(seq(12, 1.5), 12, &Device::Cpu).unwrap();
        check(
            &[x, g],
            |xs| rms_norm(&xs[0], &xs[1], 1e-5).unwrap(),
            |xs| {
                let rms =
                    (xs[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5).unwrap().sqrt().unwrap();
                xs[0].broadcast_div(&rms).unwrap().broadcast_mul(&xs[1]).unwrap()
            },
        );
    }

    #[test]
    fn rope_heads_matches_the_composed_rotation_and_its_gradient() {
        let (b, t, nh, hd) = (2, 5, 3, 4);
        let tables = RopeTables::new(t, hd, 10_000.0);
        let cos = Tensor::from_vec(tables.cos.to_vec(), (t, hd / 2), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(tables.sin.to_vec(), (t, hd / 2), &Device::Cpu).unwrap();
        let x = Var::from_vec(seq(b * t * nh * hd, 1.0), (b, t, nh * hd), &Device::Cpu).unwrap();
        check(
            &[x],
            |xs| rope_heads(&xs[0], &tables, nh).unwrap(),
            |xs| {
                let x = xs[0].reshape((b, t, nh, hd)).unwrap().transpose(1, 2).unwrap();
                let x1 = x.narrow(D::Minus1, 0, hd / 2).unwrap();
                let x2 = x.narrow(D::Minus1, hd / 2, hd / 2).unwrap();
                let r1 = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
                let r2 = (x1.broadcast_mul(&sin).unwrap() + x2.broadcast_mul(&cos).unwrap()).unwrap();
                Tensor::cat(&[r1, r2], D::Minus1).unwrap()
            },
        );
    }
}
