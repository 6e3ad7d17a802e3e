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
# # BatchNorm2d: the chain rule through the mean and the variance ([docs/batchnorm2d.md](../batchnorm2d.md))
#
# `minicnn/nn/reference.py` has the backward twice: the staged graph, one node at a time in reverse, and
# the short formula the layer uses. They agree; drop the path through the variance and they do not.

# %%
import numpy as np
import minicnn
from minicnn import nn
from minicnn.gradcheck import check_module, format_report
from minicnn.nn import reference as ref

minicnn.engine("textbook")
rng = np.random.default_rng(0)
x, g = rng.standard_normal((4, 3, 5, 5)) * 2 + 1, rng.standard_normal((4, 3, 5, 5))
gamma, beta = rng.uniform(0.5, 2, 3), rng.standard_normal(3)
out, cache = ref.batchnorm2d_forward(x, gamma, beta)
staged = ref.batchnorm2d_backward_staged(g, cache, gamma)
formula = ref.batchnorm2d_backward_formula(g, cache, gamma)
print(all(np.allclose(a, b) for a, b in zip(staged, formula)))   # expected: True

# %%
bn = nn.BatchNorm2d(3).double()
bn.weight.data[:], bn.bias.data[:] = gamma, beta
print(np.allclose(bn(x), out))                                   # expected: True
dx = bn.backward(g)
print(np.allclose(dx, staged[0]))                                # expected: True
print(np.allclose(dx.sum(axis=(0, 2, 3)), 0))                    # expected: True (shifting a channel changes nothing)
results = check_module(bn, x)
print(format_report(results))                                    # expected: input, weight, bias: pass
assert all(r.passed for r in results)

# %% [markdown]
# ## Break it
# Drop the path through the variance: treat `σ²` as a constant (only the mean's path is kept).

# %%
class NoVariancePath(nn.BatchNorm2d):
    def backward(self, dout):
        xhat, inv_std, training = self._saved()
        c = self.num_features
        m = xhat.shape[0] * xhat.shape[2] * xhat.shape[3]
        sum_g = dout.sum(axis=(0, 2, 3))
        self.bias.accumulate_grad(sum_g)
        self.weight.accumulate_grad((dout * xhat).sum(axis=(0, 2, 3)))
        scale = (self.weight.data * inv_std).reshape(1, c, 1, 1)
        return scale * (dout - sum_g.reshape(1, c, 1, 1) / m)    # BUG: no xhat * sum(g * xhat) term

broken = NoVariancePath(3).double()
results = check_module(broken, x)
print(format_report(results))                                    # expected: input FAIL; weight, bias pass
assert [r.tensor for r in results if not r.passed] == ["input"]

# %% [markdown]
# In eval mode the variance is a constant (the running statistic), so the same code is right there:

# %%
broken.eval()
print(all(r.passed for r in check_module(broken, x)))           # expected: True

# %% [markdown]
# **Exercise.** Which of the two sanity checks (`Σ dL/dx = 0`, `Σ x̂ dL/dx ≈ 0`) does the broken
# backward still pass?
