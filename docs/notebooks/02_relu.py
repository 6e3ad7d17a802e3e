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
# # ReLU: a gate ([docs/relu.md](../relu.md))
#
# `Y = max(X, 0)` and `dL/dX = G ⊙ 1[X > 0]`: the gradient passes where the *input* was positive.

# %%
import numpy as np
import minicnn
from minicnn import nn
from minicnn.gradcheck import check_module, format_report, off_kink

minicnn.engine("textbook")
x = np.array([[-2.0, -0.5, 0.5, 3.0]])
relu = nn.ReLU()
print(relu(x))                         # expected: [[0.  0.  0.5 3. ]]
print(relu.backward(np.ones_like(x)))  # expected: [[0. 0. 1. 1.]]

# %% [markdown]
# Finite differences near 0 compare a slope with a jump, so the checks draw inputs at least 0.05
# away from 0 (`off_kink` in `minicnn/gradcheck.py`).

# %%
x = off_kink(np.random.default_rng(0), (3, 4))
results = check_module(nn.ReLU(), x)
print(format_report(results))          # expected: input ... pass
assert all(r.passed for r in results)

# %% [markdown]
# ## Break it
# Gate with the sign of the *upstream gradient* instead of the input:

# %%
class BrokenReLU(nn.ReLU):
    def backward(self, dout):
        return dout * (dout > 0)              # BUG: the mask must come from the forward pass

results = check_module(BrokenReLU(), x)
print(format_report(results))          # expected: input ... FAIL
assert not results[0].passed

# %% [markdown]
# **Exercise.** Use `x >= 0` as the mask and check an input that is exactly 0: is that a bug?
