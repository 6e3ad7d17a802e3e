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
# # Linear, by hand ([docs/linear.md](../linear.md))
#
# `Y = X Wᵀ + b`, so `dL/dX = G W`, `dL/dW = Gᵀ X`, `dL/db = Σₙ G`. Run each cell; the comments say what
# you should see. Everything is float64: finite differences need it.

# %%
import numpy as np
import minicnn
from minicnn import nn
from minicnn.gradcheck import check_module, format_report

minicnn.engine("textbook")           # the code in minicnn/nn, nothing faster
rng = np.random.default_rng(0)
layer = nn.Linear(5, 3, seed=0).double()
x = rng.standard_normal((4, 5))
y = layer(x)
print(y.shape)                       # expected: (4, 3)
assert np.allclose(y, x @ layer.weight.data.T + layer.bias.data)

# %% [markdown]
# The backward pass: one line per equation. Compare with what the layer put in `.grad`.

# %%
g = rng.standard_normal(y.shape)     # an upstream gradient dL/dY
dx = layer.backward(g)
assert np.allclose(dx, g @ layer.weight.data)                 # dL/dX = G W
assert np.allclose(layer.weight.grad, g.T @ x)                # dL/dW = G^T X
assert np.allclose(layer.bias.grad, g.sum(axis=0))            # dL/db = sum over the batch
print(layer.weight.grad.shape == layer.weight.shape)          # expected: True (a shape check is a derivation check)

# %% [markdown]
# Finite differences agree, element by element:

# %%
results = check_module(layer, x)
print(format_report(results))        # expected: three rows, all "pass"
assert all(r.passed for r in results)

# %% [markdown]
# ## Break it
# The classic mistake: the bias gradient averaged over the batch instead of summed.

# %%
class BrokenLinear(nn.Linear):
    def backward(self, dout, input_grad=True):
        x, = self._saved()
        self.weight.accumulate_grad(dout.T @ x)
        self.bias.accumulate_grad(dout.mean(axis=0))          # BUG: mean, not sum
        return dout @ self.weight.data

results = check_module(BrokenLinear(5, 3, seed=0).double(), x)
print(format_report(results))        # expected: the bias row says FAIL, the others pass
assert [r.tensor for r in results if not r.passed] == ["bias"]

# %% [markdown]
# **Exercise.** Write `dL/dX` as `G Wᵀ` instead and run the check: what does it say, and why does the shape
# not even match?
