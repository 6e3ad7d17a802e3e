# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Conv2d as im2col + one matrix product ([docs/conv2d.md](../conv2d.md))
#
# `col = im2col(x)`, `Y = col Wmᵀ + b`; backward: `dWm = dᵀ col`, `db = Σ d`, `dx = col2im(d Wm)`, where
# `col2im` is the adjoint of `im2col`: it **adds** each row back onto the pixels it came from.

# %%
import numpy as np
import minicnn
from minicnn import nn
from minicnn.gradcheck import check_module, format_report
from minicnn.nn import reference as ref
from minicnn.nn.im2col import col2im, im2col

minicnn.engine("textbook")
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 3, 6, 5))
col = im2col(x, 3, 3, stride=1, padding=1)
print(col.shape)                          # expected: (60, 27): N*OH*OW rows, C*K*K columns
c = rng.standard_normal(col.shape)
# <im2col(x), c> = <x, col2im(c)>: col2im is the adjoint of im2col
print(np.isclose((col * c).sum(), (x * col2im(c, x.shape, 3, 3, 1, 1)).sum()))   # expected: True

# %%
conv = nn.Conv2d(3, 4, 3, stride=1, padding=1, seed=0).double()
y = conv(x)
print(np.allclose(y, ref.conv2d_forward(x, conv.weight.data, conv.bias.data, 1, 1)))  # expected: True
results = check_module(conv, x)
print(format_report(results))             # expected: input, weight, bias: pass
assert all(r.passed for r in results)

# %% [markdown]
# ## Break it
# `col2im` that *assigns* instead of adding: overlapping windows (a 3x3 kernel at stride 1) lose gradient.

# %%
def col2im_assign(col, x_shape, kh, kw, stride=1, padding=0):
    n, c, h, w = x_shape
    oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    col = col.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((n, c, h + 2 * padding, w + 2 * padding))
    for i in range(kh):
        for j in range(kw):
            img[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] = col[:, :, i, j]   # BUG: = not +=
    return img[:, :, padding:padding + h, padding:padding + w]


class BrokenConv(nn.Conv2d):
    def backward(self, dout, input_grad=True):
        x_shape, col = self._saved()
        d = dout.transpose(0, 2, 3, 1).reshape(-1, self.out_channels)
        self.bias.accumulate_grad(d.sum(axis=0))
        self.weight.accumulate_grad((d.T @ col).reshape(self.weight.shape))
        dcol = d @ self.weight.data.reshape(self.out_channels, -1)
        return col2im_assign(dcol, x_shape, 3, 3, self.stride, self.padding)

results = check_module(BrokenConv(3, 4, 3, 1, 1, seed=0).double(), x)
print(format_report(results))             # expected: input FAIL; weight and bias pass
assert [r.tensor for r in results if not r.passed] == ["input"]

# %% [markdown]
# **Exercise.** Run the broken conv with `kernel_size=2, stride=2`: the windows no longer overlap.
# Does the check still fail? Why?
