// minicnn's CUDA kernels: the GPU engine's replacements for the textbook layers' slowest array code.
//
// Compiled by CuPy (cupy.RawModule) once per dtype, with -Dreal=float or -Dreal=double; launched
// from minicnn/kernels/gpu.py, which shows each one's Python equivalent. Every kernel is a
// grid-stride loop over its outputs: output i is written by exactly one thread, which gathers what
// it needs (col2im and the pooling backward included), so there are no atomics, no shared memory,
// no races, and the result does not depend on the launch shape. (tests/cupy_emulator.py relies on
// that to run these kernels on a CPU, one thread after the other.)
//
// Index arithmetic is done in `idx`: int when every array and the grid fit in 31 bits, as they do
// up to large batches, long long beyond (compiled with -DWIDE_INDEX): 64-bit division costs a GPU
// dozens of instructions, and im2col does several per element.
//
// Layouts are the textbook's: images (N, C, H, W) in C order; im2col rows (n, oh, ow) and
// columns (c, i, j), as in minicnn/kernels/im2col.py.
//
// Values that change from step to step (the learning rate, dropout's seed) are read from device
// memory, not passed as arguments: a training step captured as a CUDA graph (minicnn/training/
// graph.py) replays its launches with the arguments they had at capture, and sees new values only
// through memory.

#ifdef WIDE_INDEX
typedef long long idx;
#else
typedef int idx;
#endif

#define GRID_STRIDE_LOOP(i, total)                                                             \
    for (idx i = (idx)blockIdx.x * blockDim.x + threadIdx.x; i < (idx)(total);                   \
         i += (idx)blockDim.x * gridDim.x)

// col[(n, oy, ox), (ci, i, j)] = x[n, ci, oy*s + i - p, ox*s + j - p], or 0 in the padding.
extern "C" __global__ void im2col(const real* x, real* col, int n, int c, int h, int w, int kh, int kw,
                                  int s, int p, int oh, int ow) {
    const idx kcols = (idx)c * kh * kw;
    const idx total = (idx)n * oh * ow * kcols;
    GRID_STRIDE_LOOP(e, total) {
        idx row = e / kcols;
        int q = (int)(e % kcols);
        int j = q % kw, i = (q / kw) % kh, ci = q / (kw * kh);
        int ox = (int)(row % ow), oy = (int)((row / ow) % oh);
        idx ni = row / ((idx)ow * oh);
        int y = oy * s + i - p, xx = ox * s + j - p;
        col[e] = (y >= 0 && y < h && xx >= 0 && xx < w) ? x[((ni * c + ci) * h + y) * w + xx] : (real)0;
    }
}

// The adjoint of im2col, as a gather: each pixel sums the entries of every window that saw it.
// Pixel y is seen by output row oy at kernel offset i = y + p - oy*s, for each oy with 0 <= i < kh.
extern "C" __global__ void col2im(const real* col, real* x, int n, int c, int h, int w, int kh, int kw,
                                  int s, int p, int oh, int ow) {
    const idx kcols = (idx)c * kh * kw;
    const idx total = (idx)n * c * h * w;
    GRID_STRIDE_LOOP(e, total) {
        int xx = (int)(e % w), y = (int)((e / w) % h), ci = (int)((e / ((idx)w * h)) % c);
        idx ni = e / ((idx)w * h * c);
        real sum = 0;
        for (int i = 0; i < kh; ++i) {
            int ty = y + p - i;                           // = oy * s for the row that used offset i
            if (ty < 0 || ty % s != 0 || ty / s >= oh) continue;
            int oy = ty / s;
            for (int j = 0; j < kw; ++j) {
                int tx = xx + p - j;
                if (tx < 0 || tx % s != 0 || tx / s >= ow) continue;
                int ox = tx / s;
                sum += col[((ni * oh + oy) * ow + ox) * kcols + ((idx)ci * kh + i) * kw + j];
            }
        }
        x[e] = sum;
    }
}

// Max-pooling, k x k windows at stride s (floor mode): the maximum, and its offset i*k + j in the
// window (one byte; the first maximum wins ties, and a NaN wins, as in PyTorch).
extern "C" __global__ void maxpool_forward(const real* x, real* out, unsigned char* arg, int nc, int h, int w,
                                           int k, int s, int oh, int ow) {
    const idx total = (idx)nc * oh * ow;
    GRID_STRIDE_LOOP(e, total) {
        int ox = (int)(e % ow), oy = (int)((e / ow) % oh);
        const real* plane = x + (e / ((idx)ow * oh)) * h * w;
        real best = plane[(oy * s) * w + ox * s];
        int where = 0;
        for (int i = 0; i < k; ++i)
            for (int j = 0; j < k; ++j) {
                real v = plane[(oy * s + i) * w + ox * s + j];
                if (v > best || (v != v && best == best)) { best = v; where = i * k + j; }
            }
        out[e] = best;
        arg[e] = (unsigned char)where;
    }
}

// dL/dx of max-pooling, as a gather: each input pixel sums the gradients of the windows whose
// maximum it was (with overlapping windows a pixel can win several).
extern "C" __global__ void maxpool_backward(const real* dout, const unsigned char* arg, real* dx, int nc,
                                            int h, int w, int k, int s, int oh, int ow) {
    const idx total = (idx)nc * h * w;
    GRID_STRIDE_LOOP(e, total) {
        int xx = (int)(e % w), y = (int)((e / w) % h);
        idx plane = (e / ((idx)w * h)) * oh * ow;
        real sum = 0;
        // windows oy with oy*s <= y < oy*s + k, i.e. (y - k) / s < oy <= y / s
        int oy_lo = y >= k ? (y - k) / s + 1 : 0, ox_lo = xx >= k ? (xx - k) / s + 1 : 0;
        for (int oy = oy_lo; oy <= y / s && oy < oh; ++oy)
            for (int ox = ox_lo; ox <= xx / s && ox < ow; ++ox) {
                idx o = plane + (idx)oy * ow + ox;
                if (arg[o] == (y - oy * s) * k + (xx - ox * s)) sum += dout[o];
            }
        dx[e] = sum;
    }
}

// BatchNorm statistics, step 1: per-channel partial sums of x - shift and (x - shift)^2 in float64,
// where shift = the channel's first value (so the one-pass variance keeps its precision). Thread
// (channel ch, slice sl) sums values sl, sl + slices, ... of the channel's M = N*H*W: neighbouring
// threads read neighbouring addresses. partial is (2, C, slices); CuPy adds up the slices (a sum
// over the last axis: a tree in shared memory, which a loop here would do one slice at a time).
extern "C" __global__ void channel_moments(const real* x, double* partial, int n, int c, int hw, int slices) {
    const idx m_total = (idx)n * hw, chw = (idx)c * hw;
    GRID_STRIDE_LOOP(t, (idx)c * slices) {
        int ch = (int)(t / slices), sl = (int)(t % slices);
        const double shift = x[(idx)ch * hw];
        double s1 = 0, s2 = 0;
        for (idx m = sl; m < m_total; m += slices) {
            double d = (double)x[(m / hw) * chw + (idx)ch * hw + m % hw] - shift;
            s1 += d;
            s2 += d * d;
        }
        partial[t] = s1;
        partial[(idx)c * slices + t] = s2;
    }
}

// The running statistics of channel ch updated in place with a batch's mean and (biased) variance
// over m values, PyTorch's rule with the unbiased variance: running = (1 - f) * running + f * batch,
// f = momentum, or 1 / num_batches_tracked when momentum < 0 (the cumulative average; the caller
// has already counted this batch).
__device__ __forceinline__ void update_running(real* running_mean, real* running_var, const long long* num_batches,
                                               double momentum, int ch, double mean, double var, double m) {
    const double f = momentum >= 0 ? momentum : 1.0 / (double)num_batches[0];
    running_mean[ch] = (real)((1 - f) * running_mean[ch] + f * mean);
    running_var[ch] = (real)((1 - f) * running_var[ch] + f * var * (m / (m - 1)));
}

// BatchNorm statistics, step 2 (after CuPy has added up step 1's slices into sums (2, C)), one
// thread per channel: the batch mean and 1 / sqrt(var + eps), and the running statistics updated.
extern "C" __global__ void batchnorm_statistics(const double* sums, const real* x, real* running_mean,
                                                real* running_var, const long long* num_batches, real* mean,
                                                real* inv_std, int n, int c, int hw, double momentum, double eps) {
    GRID_STRIDE_LOOP(ch, c) {
        const double m = (double)n * hw, shift = x[(idx)ch * hw], s1 = sums[ch], s2 = sums[c + ch];
        const double mu = shift + s1 / m, var = max(s2 / m - (s1 / m) * (s1 / m), 0.0);
        mean[ch] = (real)mu;
        inv_std[ch] = (real)(1.0 / sqrt(var + eps));
        update_running(running_mean, running_var, num_batches, momentum, ch, mu, var, m);
    }
}

// BatchNorm forward, given the per-channel statistics: xhat = (x - mean) * inv_std (kept for the
// backward pass) and out = gamma * xhat + beta, in one pass; with relu, out = max(that, 0) (the
// ReLU that follows, fused). hw = H*W; channel = (i / hw) % c.
extern "C" __global__ void batchnorm_forward(const real* x, const real* mean, const real* inv_std,
                                             const real* gamma, const real* beta, real* xhat, real* out,
                                             long long total, int c, int hw, int relu) {
    GRID_STRIDE_LOOP(i, total) {
        int ch = (int)((i / hw) % c);
        real xh = (x[i] - mean[ch]) * inv_std[ch];
        real y = gamma[ch] * xh + beta[ch];
        xhat[i] = xh;
        out[i] = relu && y < 0 ? (real)0 : y;            // (as x * (x > 0): NaN stays NaN)
    }
}

// BatchNorm backward, step 1: per-channel partial sums of g and g * xhat, as channel_moments does;
// with relu, g is first masked by the fused ReLU's output y (g = 0 where y <= 0).
extern "C" __global__ void channel_grad_sums(const real* g, const real* xhat, const real* y, double* partial, int n,
                                             int c, int hw, int slices, int relu) {
    const idx m_total = (idx)n * hw, chw = (idx)c * hw;
    GRID_STRIDE_LOOP(t, (idx)c * slices) {
        int ch = (int)(t / slices), sl = (int)(t % slices);
        double s1 = 0, s2 = 0;
        for (idx m = sl; m < m_total; m += slices) {
            idx e = (m / hw) * chw + (idx)ch * hw + m % hw;
            double gi = relu && !(y[e] > 0) ? 0.0 : (double)g[e];
            s1 += gi;
            s2 += gi * xhat[e];
        }
        partial[t] = s1;
        partial[(idx)c * slices + t] = s2;
    }
}

// BatchNorm backward, step 2, with scale = gamma * inv_std and the two sums:
// training: dx = scale * (g - (sum_g + xhat * sum_g_xhat) / M);  eval: dx = scale * g
// (g masked by the fused ReLU's output first, with relu).
extern "C" __global__ void batchnorm_backward(const real* g, const real* xhat, const real* y, const real* gamma,
                                              const real* inv_std, const double* sum_g, const double* sum_g_xhat,
                                              real* dx, long long total, int c, int hw, double inv_m, int training,
                                              int relu) {
    GRID_STRIDE_LOOP(i, total) {
        int ch = (int)((i / hw) % c);
        real gi = relu && !(y[i] > 0) ? (real)0 : g[i];
        real scale = gamma[ch] * inv_std[ch];
        dx[i] = training ? scale * (gi - (real)((sum_g[ch] + xhat[i] * sum_g_xhat[ch]) * inv_m)) : scale * gi;
    }
}

// Dropout with counter-based random numbers: u_i = hash(seed, i) in [0, 1), so the mask needs no
// generator state and no memory. out = x * scale where u_i >= p, else 0. The same call on dL/dout
// with the same seed gives dL/dx: the mask is recomputed, never stored.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

extern "C" __global__ void dropout(const real* x, real* out, long long total, const unsigned long long* seed_ptr,
                                   double p, real scale) {
    const unsigned long long seed = *seed_ptr;
    GRID_STRIDE_LOOP(i, total) {
        double u = (double)(splitmix64(seed ^ splitmix64((unsigned long long)i)) >> 11) * (1.0 / 9007199254740992.0);
        out[i] = u >= p ? x[i] * scale : (real)0;
    }
}

// Softmax cross-entropy, one row (sample) per thread. With logp = z - logsumexp(z) and the target
// distribution q = (1 - eps) * w[y] * onehot(y) + (eps / C) * w (see minicnn/nn/loss.py):
// row_loss = sum_c q_c * (-logp_c), row_w = w[y], grad = sum(q) * softmax(z) - q (not yet divided
// by the total weight).
extern "C" __global__ void softmax_cross_entropy(const real* z, const long long* labels, const real* w,
                                                 real* row_loss, real* row_w, real* grad, int n, int c,
                                                 real eps) {
    GRID_STRIDE_LOOP(r, n) {
        const real* zr = z + r * c;
        real* gr = grad + r * c;
        long long y = labels[r];
        real zmax = zr[0];
        for (int k = 1; k < c; ++k) zmax = max(zmax, zr[k]);
        real total = 0;
        for (int k = 0; k < c; ++k) total += exp(zr[k] - zmax);
        real lse = zmax + log(total);
        real loss = 0, sum_q = 0;
        for (int k = 0; k < c; ++k) {
            real q = (eps / c) * w[k] + (k == y ? (1 - eps) * w[y] : (real)0);
            loss -= q * (zr[k] - lse);
            sum_q += q;
            gr[k] = -q;
        }
        for (int k = 0; k < c; ++k) gr[k] += sum_q * exp(zr[k] - lse);
        row_loss[r] = loss;
        row_w[r] = w[y];
    }
}

// One SGD step for a flat parameter, PyTorch's rule (minicnn/optim/sgd.py), in one pass.
// hyper = {lr, momentum, dampening, weight_decay}.
extern "C" __global__ void sgd_update(real* p, const real* g, real* buf, long long total, const real* hyper,
                                      int nesterov, int first) {
    const real lr = hyper[0], momentum = hyper[1], dampening = hyper[2], weight_decay = hyper[3];
    GRID_STRIDE_LOOP(i, total) {
        real gi = g[i] + weight_decay * p[i];
        real b = first ? gi : momentum * buf[i] + (1 - dampening) * gi;
        buf[i] = b;
        p[i] -= lr * (nesterov ? gi + momentum * b : b);
    }
}

// One Adam/AdamW step for a flat parameter (minicnn/optim/adam.py).
// hyper = {beta1, beta2, eps, step_size, root_bc2, l2, decay}: the bias corrections come in as
// step_size = lr / (1 - beta1^t) and root_bc2 = sqrt(1 - beta2^t); decay = lr * weight_decay for
// AdamW (decoupled), 0 for Adam (whose weight_decay goes into the gradient as l2).
extern "C" __global__ void adam_update(real* p, const real* g, real* m, real* v, long long total,
                                       const real* hyper) {
    const real beta1 = hyper[0], beta2 = hyper[1], eps = hyper[2], step_size = hyper[3], root_bc2 = hyper[4],
               l2 = hyper[5], decay = hyper[6];
    GRID_STRIDE_LOOP(i, total) {
        real pi = p[i] * (1 - decay);
        real gi = g[i] + l2 * p[i];
        real mi = beta1 * m[i] + (1 - beta1) * gi;
        real vi = beta2 * v[i] + (1 - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step_size * (mi / (sqrt(vi) / root_bc2 + eps));
    }
}

// --- The conv block on channels-last memory ----------------------------------------------------
// Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d as one step on the GPU (minicnn/engines/gpu/blocks.py's
// ConvBatchNormReLUPool, the CPU engine's design): images are (N, H, W, C) in C order, im2col
// rows (n, oy, ox) and columns (i, j, c) as in minicnn/engines/cpu/kernels.py, so the conv's product comes
// out channels-last with no transpose, neighbouring threads touch neighbouring channels (coalesced
// reads and writes, col2im included), and BatchNorm, ReLU and pooling share their passes over the
// conv output y: forward writes only the pooled output and a one-byte argmax, backward's sums
// read only each window's winner.

// Copy V neighbouring channels (V = 4 when C allows, else 1; the integer divisions that find
// them are then done once per V values).
template <int V> __device__ __forceinline__ void copy_channels(real* dst, const real* src) {
    for (int u = 0; u < V; ++u) dst[u] = src ? src[u] : (real)0;
}

template <int V>
__device__ __forceinline__ void im2col_nhwc_group(const real* x, real* col, idx e, int groups, int h, int w,
                                                  int c, int k, int s, int p, int oh, int ow) {
    int cg = (int)(e % groups);
    idx t = e / groups;                                   // t = row * k*k + tap: one (i, j) of one row
    int tap = (int)(t % (k * k));
    idx row = t / (k * k), r2 = row / ow;
    int i = tap / k, j = tap - i * k, ox = (int)(row % ow), oy = (int)(r2 % oh);
    idx ni = r2 / oh;
    int y = oy * s + i - p, xx = ox * s + j - p;
    bool inside = y >= 0 && y < h && xx >= 0 && xx < w;
    copy_channels<V>(col + t * c + cg * V, inside ? x + ((ni * h + y) * w + xx) * c + cg * V : nullptr);
}

// col[(n, oy, ox), (i, j, ci)] = x[n, oy*s + i - p, ox*s + j - p, ci], or 0 in the padding.
extern "C" __global__ void im2col_nhwc(const real* x, real* col, int n, int h, int w, int c, int k, int s, int p,
                                       int oh, int ow, int v) {
    const int groups = c / v;
    const idx total = (idx)n * oh * ow * k * k * groups;
    GRID_STRIDE_LOOP(e, total) {
        if (v == 4) im2col_nhwc_group<4>(x, col, e, groups, h, w, c, k, s, p, oh, ow);
        else im2col_nhwc_group<1>(x, col, e, groups, h, w, c, k, s, p, oh, ow);
    }
}

template <int V>
__device__ __forceinline__ void col2im_nhwc_group(const real* dcol, real* dx, idx e, int groups, int h, int w,
                                                  int c, int k, int s, int p, int oh, int ow) {
    int cg = (int)(e % groups);
    idx pix = e / groups, r2 = pix / w;
    int xx = (int)(pix % w), y = (int)(r2 % h);
    idx ni = r2 / h;
    // Pixel y is row oy's offset i = y + p - oy*s for the oy with 0 <= i < k: (y + p - k) / s < oy <= (y + p) / s.
    int ty = y + p, tx = xx + p;
    int oy_lo = ty >= k ? (ty - k) / s + 1 : 0, oy_hi = min(ty / s, oh - 1);
    int ox_lo = tx >= k ? (tx - k) / s + 1 : 0, ox_hi = min(tx / s, ow - 1);
    real sum[V];
    for (int u = 0; u < V; ++u) sum[u] = 0;
    for (int oy = oy_lo; oy <= oy_hi; ++oy)
        for (int ox = ox_lo; ox <= ox_hi; ++ox) {
            int i = ty - oy * s, j = tx - ox * s;
            const real* src = dcol + (((ni * oh + oy) * ow + ox) * k * k + i * k + j) * c + cg * V;
            for (int u = 0; u < V; ++u) sum[u] += src[u];
        }
    for (int u = 0; u < V; ++u) dx[pix * c + cg * V + u] = sum[u];
}

// The adjoint of im2col_nhwc, as a gather: dx[n, y, x, ci] sums dcol over the windows that saw the pixel.
extern "C" __global__ void col2im_nhwc(const real* dcol, real* dx, int n, int h, int w, int c, int k, int s, int p,
                                       int oh, int ow, int v) {
    const int groups = c / v;
    const idx total = (idx)n * h * w * groups;
    GRID_STRIDE_LOOP(e, total) {
        if (v == 4) col2im_nhwc_group<4>(dcol, dx, e, groups, h, w, c, k, s, p, oh, ow);
        else col2im_nhwc_group<1>(dcol, dx, e, groups, h, w, c, k, s, p, oh, ow);
    }
}

// BatchNorm statistics of the conv output y seen as (M, C) rows, step 1: thread (slice sl, channel
// ch) sums rows sl, sl + slices, ... of y - shift and (y - shift)^2 in float64 (shift: row 0's
// value); neighbouring threads read neighbouring channels. partial is (2, C, slices); CuPy then
// adds up the slices.
extern "C" __global__ void channel_moments_rows(const real* y, double* partial, long long m, int c, int slices) {
    GRID_STRIDE_LOOP(t, (idx)slices * c) {
        int ch = (int)(t % c), sl = (int)(t / c);
        const double shift = y[ch];
        double s1 = 0, s2 = 0;
        for (idx r = sl; r < m; r += slices) {
            double d = (double)y[r * c + ch] - shift;
            s1 += d;
            s2 += d * d;
        }
        partial[(idx)ch * slices + sl] = s1;
        partial[((idx)c + ch) * slices + sl] = s2;
    }
}

// Step 2, one thread per channel: with sums (2, C) of step 1 in training, or the running
// statistics in eval, the mean and 1/sqrt(var + eps) (float64) of y, the conv output *without* its
// bias, and scale = gamma * inv_std, shift = beta - mean * scale, so that BatchNorm(y + bias) =
// y * scale + shift (in training the bias cancels: the mean moves with it). Training updates the
// running statistics (update_running) with the true mean, of y + bias.
extern "C" __global__ void batchnorm_affine(const double* sums, const real* y, const real* bias, const real* gamma,
                                            const real* beta, real* running_mean, real* running_var,
                                            const long long* num_batches, double* mean, double* inv_std, real* scale,
                                            real* shift, long long m, int c, double momentum, double eps,
                                            int training, int has_bias) {
    GRID_STRIDE_LOOP(ch, c) {
        const double b = has_bias ? (double)bias[ch] : 0.0;
        double mu, var;
        if (training) {
            const double s1 = sums[ch] / m, s2 = sums[c + ch] / m;
            mu = (double)y[ch] + s1;
            var = max(s2 - s1 * s1, 0.0);
            update_running(running_mean, running_var, num_batches, momentum, ch, mu + b, var, (double)m);
        } else {
            mu = (double)running_mean[ch] - b;
            var = (double)running_var[ch];
        }
        const double is = 1.0 / sqrt(var + eps), sc = (double)gamma[ch] * is;
        mean[ch] = mu;
        inv_std[ch] = is;
        scale[ch] = (real)sc;
        shift[ch] = (real)((double)beta[ch] - mu * sc);
    }
}

template <int V>
__device__ __forceinline__ void bn_relu_pool_group(const real* y, const real* scale, const real* shift, real* out,
                                                   unsigned char* arg, idx e, int groups, int h, int w, int c,
                                                   int k, int oh, int ow) {
    int ch0 = (int)(e % groups) * V;
    idx cell = e / groups, r2 = cell / ow;
    int px = (int)(cell % ow), py = (int)(r2 % oh);
    const real* window = y + (((r2 / oh) * h + py * k) * w + px * k) * c + ch0;
    for (int u = 0; u < V; ++u) {
        const real sc = scale[ch0 + u], sh = shift[ch0 + u];
        real best = 0;
        int where = 0;
        for (int i = 0; i < k; ++i)
            for (int j = 0; j < k; ++j) {
                real v = window[((idx)i * w + j) * c + u] * sc + sh;
                v = v > 0 || v != v ? v : (real)0;          // ReLU (a NaN stays NaN, -inf gives 0)
                if ((i == 0 && j == 0) || v > best || (v != v && best == best)) { best = v; where = i * k + j; }
            }
        out[cell * c + ch0 + u] = best;
        arg[cell * c + ch0 + u] = (unsigned char)where;
    }
}

// out[n, py, px, ch] = the maximum over the k x k window of relu(y * scale + shift), and arg = i*k + j
// of its first maximum (the CPU engine's bn_relu_pool_forward; the ReLU keeps NaN as NaN and a NaN wins
// the window, as in PyTorch).
// Each thread does v neighbouring channels (4 when C allows), as im2col_nhwc.
extern "C" __global__ void bn_relu_pool_forward_nhwc(const real* y, const real* scale, const real* shift, real* out,
                                                     unsigned char* arg, int n, int h, int w, int c, int k, int oh,
                                                     int ow, int v) {
    const int groups = c / v;
    const idx total = (idx)n * oh * ow * groups;
    GRID_STRIDE_LOOP(e, total) {
        if (v == 4) bn_relu_pool_group<4>(y, scale, shift, out, arg, e, groups, h, w, c, k, oh, ow);
        else bn_relu_pool_group<1>(y, scale, shift, out, arg, e, groups, h, w, c, k, oh, ow);
    }
}

// Backward step 1: per-channel partial sums over the pooled cells of g_bn and g_bn * (y - mean),
// g_bn = dL/d(BatchNorm output): each window's gradient at its winner if the ReLU let it through, 0
// at every other pixel. Threads (slice, channel) as in channel_moments_rows; partial is (2, C, slices).
extern "C" __global__ void bn_relu_pool_grad_sums_nhwc(const real* g, const unsigned char* arg, const real* y,
                                                       const real* scale, const real* shift, const double* mean,
                                                       double* partial, int n, int h, int w, int c, int k, int oh,
                                                       int ow, int slices) {
    const idx cells = (idx)n * oh * ow;
    GRID_STRIDE_LOOP(t, (idx)slices * c) {
        int ch = (int)(t % c), sl = (int)(t / c);
        const real sc = scale[ch], sh = shift[ch];
        const double mu = mean[ch];
        double s1 = 0, s2 = 0;
        for (idx cell = sl; cell < cells; cell += slices) {
            idx o = cell * c + ch, r2 = cell / ow;
            int a = arg[o], i = a / k, j = a - (a / k) * k, px = (int)(cell % ow), py = (int)(r2 % oh);
            real yv = y[(((r2 / oh) * h + py * k + i) * w + px * k + j) * c + ch];
            double gv = yv * sc + sh > 0 ? (double)g[o] : 0.0;
            s1 += gv;
            s2 += gv * ((double)yv - mu);
        }
        partial[(idx)ch * slices + sl] = s1;
        partial[((idx)c + ch) * slices + sl] = s2;
    }
}

// Backward step 2, one thread per channel, from the sums (2, C) = (sum g_bn, sum g_bn * (y - mean)):
// dgamma = sum(g_bn * xhat), dbeta = sum(g_bn), and (a, b, c0) such that dL/dy = a * g_bn + b * y + c0
// (BatchNorm's backward as an affine map of y: BatchNorm2d._fast_backward_affine), and the conv
// bias's gradient sum(dL/dy) = a * sum_g + (b * mean + c0) * M: 0 in training, up to rounding.
extern "C" __global__ void batchnorm_backward_affine(const double* sums, const double* mean, const double* inv_std,
                                                     const real* gamma, real* a, real* b, real* c0, real* dgamma,
                                                     real* dbeta, real* dbias, long long m, int c, int training) {
    GRID_STRIDE_LOOP(ch, c) {
        const double sum_g = sums[ch], sum_g_xhat = sums[c + ch] * inv_std[ch], av = (double)gamma[ch] * inv_std[ch];
        double bv = 0, cv = 0;
        if (training) {          // a * (g - (sum_g + xhat * sum_g_xhat) / M), xhat = (y - mean) * inv_std
            bv = -av * inv_std[ch] * sum_g_xhat / (double)m;
            cv = -av * sum_g / (double)m - bv * mean[ch];
        }
        a[ch] = (real)av;
        b[ch] = (real)bv;
        c0[ch] = (real)cv;
        dgamma[ch] = (real)sum_g_xhat;
        dbeta[ch] = (real)sum_g;
        dbias[ch] = (real)(av * sum_g + (bv * mean[ch] + cv) * (double)m);
    }
}

template <int V>
__device__ __forceinline__ void bn_relu_pool_backward_group(const real* g, const unsigned char* arg, const real* y,
                                                            const real* scale, const real* shift, const real* a,
                                                            const real* b, const real* c0, real* dy, idx e,
                                                            int groups, int h, int w, int c, int k, int oh, int ow) {
    int ch0 = (int)(e % groups) * V;
    idx pix = e / groups, r2 = pix / w;
    int xx = (int)(pix % w), yy = (int)(r2 % h), py = yy / k, px = xx / k;
    bool inside = py < oh && px < ow;
    idx o = ((((r2 / h) * oh + py) * ow + px) * c) + ch0;          // (the pooled cell; used only inside)
    int pos = (yy - py * k) * k + (xx - px * k);
    for (int u = 0; u < V; ++u) {
        int ch = ch0 + u;
        real yv = y[pix * c + ch], gv = yv * 0;
        if (inside && arg[o + u] == pos && yv * scale[ch] + shift[ch] > 0) gv = g[o + u];
        dy[pix * c + ch] = a[ch] * gv + b[ch] * yv + c0[ch];
    }
}

// Backward step 3, one thread per v neighbouring conv output values: dL/dy = a * g_bn + b * y + c0.
extern "C" __global__ void bn_relu_pool_backward_nhwc(const real* g, const unsigned char* arg, const real* y,
                                                      const real* scale, const real* shift, const real* a,
                                                      const real* b, const real* c0, real* dy, int n, int h, int w,
                                                      int c, int k, int oh, int ow, int v) {
    const int groups = c / v;
    const idx total = (idx)n * h * w * groups;
    GRID_STRIDE_LOOP(e, total) {
        if (v == 4) bn_relu_pool_backward_group<4>(g, arg, y, scale, shift, a, b, c0, dy, e, groups, h, w, c, k, oh, ow);
        else bn_relu_pool_backward_group<1>(g, arg, y, scale, shift, a, b, c0, dy, e, groups, h, w, c, k, oh, ow);
    }
}

// ---- Inference (minicnn/engines/gpu/inference.py): BatchNorm folded, no im2col, no conv buffer ----

// The grey first conv, direct: out[n, py, px, o] = relu(max over the pool x pool window of
// sum_{i,j} x[n, y + i - p, x + j - p] w[3i + j, o] + b[o]) for one input channel (x: (N, H, W)),
// as the CPU engine's grey_conv3x3_pool_bias_relu (a NaN wins the window and stays NaN).
extern "C" __global__ void grey_conv3x3_pool_bias_relu_nhwc(const real* x, const real* wt, const real* b, real* out,
                                                            int n, int h, int w, int oc, int p, int pool, int ph,
                                                            int pw) {
    const idx total = (idx)n * ph * pw * oc;
    GRID_STRIDE_LOOP(e, total) {
        int o = (int)(e % oc), px = (int)((e / oc) % pw), py = (int)((e / ((idx)oc * pw)) % ph);
        idx ni = e / ((idx)oc * pw * ph);
        const real* img = x + ni * h * w;
        real best = 0;
        for (int wi = 0; wi < pool * pool; ++wi) {
            int oy = py * pool + wi / pool, ox = px * pool + wi % pool;
            real s = 0;
            for (int i = 0; i < 3; ++i) {
                int yy = oy + i - p;
                if (yy < 0 || yy >= h) continue;
                for (int j = 0; j < 3; ++j) {
                    int xx = ox + j - p;
                    if (xx >= 0 && xx < w) s += img[yy * w + xx] * wt[(i * 3 + j) * oc + o];
                }
            }
            if (wi == 0 || s > best || (s != s && best == best)) best = s;
        }
        real v = best + b[o];
        out[e] = (v > 0 || v != v) ? v : (real)0;
    }
}

// Winograd F(m x m, 3x3), m = T - 2, T x T tiles of stride m (T = 4 or 6): the input transform
// V[ab, tile, c] = (B^T d B)[a, b] of tile (n, ty, tx)'s T x T values d of channel c of the
// channels-last x (N, H, W, C), zero outside the image (the conv's padding p). bt: B^T, T x T.
// T is a template parameter: constant trip counts, which nvcc unrolls, so d and r stay in registers.
template <int T>
__device__ void winograd_input_tile(const real* x, const real* bt, real* v, idx e, idx tiles, int h, int w, int c,
                                    int p, int th, int tw) {
    const int m = T - 2;
    int ci = (int)(e % c);
    idx tile = e / c;
    int tx = (int)(tile % tw), ty = (int)((tile / tw) % th);
    idx ni = tile / ((idx)tw * th);
    real d[T][T], r[T][T];
    for (int i = 0; i < T; ++i) {
        int yy = ty * m + i - p;
        for (int j = 0; j < T; ++j) {
            int xx = tx * m + j - p;
            d[i][j] = (yy >= 0 && yy < h && xx >= 0 && xx < w) ? x[((ni * h + yy) * w + xx) * c + ci] : (real)0;
        }
    }
    for (int a = 0; a < T; ++a)                           // r = B^T d
        for (int j = 0; j < T; ++j) {
            real s = 0;
            for (int i = 0; i < T; ++i) s += bt[a * T + i] * d[i][j];
            r[a][j] = s;
        }
    for (int a = 0; a < T; ++a)                           // V = r B
        for (int b = 0; b < T; ++b) {
            real s = 0;
            for (int j = 0; j < T; ++j) s += r[a][j] * bt[b * T + j];
            v[((idx)(a * T + b) * tiles + tile) * c + ci] = s;
        }
}

extern "C" __global__ void winograd_input_nhwc(const real* x, const real* bt, real* v, int n, int h, int w, int c,
                                               int p, int th, int tw, int t) {
    const idx tiles = (idx)n * th * tw;
    GRID_STRIDE_LOOP(e, tiles * c) {
        if (t == 6) winograd_input_tile<6>(x, bt, v, e, tiles, h, w, c, p, th, tw);
        else winograd_input_tile<4>(x, bt, v, e, tiles, h, w, c, p, th, tw);
    }
}

// The output transform with the block's epilogue: Y = A^T M A (m x m outputs) of tile (n, ty, tx)
// and output channel o, then max pooling (pool divides m), + b, ReLU; writes only the pooled map
// out (N, PH, PW, OC). at: A^T, m x T; mm: (T*T, tiles, OC), the products V[ab] U[ab].
template <int T>
__device__ void winograd_output_tile(const real* mm, const real* at, const real* b, real* out, idx e, idx tiles,
                                     int oc, int th, int tw, int pool, int ph, int pw) {
    const int m = T - 2;
    int o = (int)(e % oc);
    idx tile = e / oc;
    int tx = (int)(tile % tw), ty = (int)((tile / tw) % th);
    idx ni = tile / ((idx)tw * th);
    real f[m][T], y[m][m];
    for (int r = 0; r < m; ++r)                           // f = A^T M
        for (int bb = 0; bb < T; ++bb) {
            real s = 0;
            for (int a = 0; a < T; ++a) s += at[r * T + a] * mm[((idx)(a * T + bb) * tiles + tile) * oc + o];
            f[r][bb] = s;
        }
    for (int r = 0; r < m; ++r)                           // Y = f A
        for (int q = 0; q < m; ++q) {
            real s = 0;
            for (int bb = 0; bb < T; ++bb) s += f[r][bb] * at[q * T + bb];
            y[r][q] = s;
        }
    const real bo = b[o];
    for (int pr = 0; pr < m / pool; ++pr)
        for (int pc = 0; pc < m / pool; ++pc) {
            int py = ty * (m / pool) + pr, px = tx * (m / pool) + pc;
            if (py >= ph || px >= pw) continue;
            real best = y[pr * pool][pc * pool];
            for (int i = 0; i < pool; ++i)
                for (int j = 0; j < pool; ++j) {
                    real s = y[pr * pool + i][pc * pool + j];
                    if (s > best || (s != s && best == best)) best = s;
                }
            real vv = best + bo;
            out[((ni * ph + py) * pw + px) * oc + o] = (vv > 0 || vv != vv) ? vv : (real)0;
        }
}

extern "C" __global__ void winograd_output_pool_bias_relu_nhwc(const real* mm, const real* at, const real* b,
                                                               real* out, int n, int oc, int th, int tw, int t,
                                                               int pool, int ph, int pw) {
    const idx tiles = (idx)n * th * tw;
    GRID_STRIDE_LOOP(e, tiles * oc) {
        if (t == 6) winograd_output_tile<6>(mm, at, b, out, e, tiles, oc, th, tw, pool, ph, pw);
        else winograd_output_tile<4>(mm, at, b, out, e, tiles, oc, th, tw, pool, ph, pw);
    }
}

// A Linear layer's epilogue, in place: y[r, c] += b[c], then ReLU if relu (a NaN stays NaN).
extern "C" __global__ void bias_relu_rows(real* y, const real* b, int rows, int cols, int relu) {
    GRID_STRIDE_LOOP(e, (idx)rows * cols) {
        real v = y[e] + b[(int)(e % cols)];
        y[e] = (!relu || v > 0 || v != v) ? v : (real)0;
    }
}
