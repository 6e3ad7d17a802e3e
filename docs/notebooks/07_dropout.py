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
# # Dropout: the mask is a constant of the forward pass ([docs/dropout.md](../dropout.md))

# %%
import numpy as np
import minicnn
from minicnn import nn
from minicnn.gradcheck import check_module, format_report

minicnn.engine("textbook")
d = nn.Dropout(0.5, seed=0)
x = np.ones((1000, 100))
y = d(x)
print(sorted(set(np.unique(y))))           # expected: [0.0, 2.0]: kept values are scaled by 1/(1-p)
print(round(y.mean(), 1))                  # expected: 1.0, the input's mean
print(np.array_equal(d.backward(np.ones_like(x)), y))   # expected: True: the same mask
print(np.array_equal(d.eval()(x), x))      # expected: True: evaluation is the identity

# %%
results = check_module(nn.Dropout(0.4, seed=0).double(), np.random.default_rng(0).standard_normal((4, 6)))
print(format_report(results))              # expected: input ... pass (the check holds the mask fixed)
assert all(r.passed for r in results)

# %% [markdown]
# ## Break it
# Draw a new mask in the backward pass:

# %%
class BrokenDropout(nn.Dropout):
    def backward(self, dout):
        keep = self.rng.random(dout.shape) >= self.p             # BUG: a fresh mask
        return dout * keep / (1 - self.p)

results = check_module(BrokenDropout(0.4, seed=0).double(), np.random.default_rng(0).standard_normal((4, 6)))
print(format_report(results))              # expected: input ... FAIL
assert not results[0].passed
