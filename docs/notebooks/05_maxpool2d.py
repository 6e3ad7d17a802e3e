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
# # MaxPool2d: the gradient goes to the winner ([docs/maxpool2d.md](../maxpool2d.md))

# %%
import numpy as np
import minicnn
from minicnn import nn
from minicnn.gradcheck import check_module, distinct_values, format_report

minicnn.engine("textbook")
x = np.array([[[[1.0, 3.0, 2.0, 0.0],
                [3.0, 0.0, 1.0, 5.0],
                [0.0, 0.0, 4.0, 4.0],
                [0.0, 0.0, 4.0, 1.0]]]])
pool = nn.MaxPool2d(2)
print(pool(x)[0, 0])                      # expected: [[3. 5.] [0. 4.]]
dx = pool.backward(np.ones((1, 1, 2, 2)))[0, 0]
print(dx)                                 # expected: a 1 at each window's *first* maximum, 4 in all
assert dx.sum() == 4

# %% [markdown]
# Ties have no derivative, so checks draw values at least 0.05 apart (`distinct_values`):

# %%
x = distinct_values(np.random.default_rng(0), (2, 3, 6, 7))
results = check_module(nn.MaxPool2d(2), x)
print(format_report(results))             # expected: input ... pass
assert all(r.passed for r in results)

# %% [markdown]
# ## Break it
# Spread each window's gradient over the whole window (average pooling's backward):

# %%
class BrokenPool(nn.MaxPool2d):
    def backward(self, dout):
        x_shape, argmax = self._saved()
        dx = np.zeros(x_shape)
        oh, ow = argmax.shape[2:]
        for view in self._views(dx, oh, ow):
            view += dout / self.kernel_size ** 2      # BUG: every input of the window, not the winner
        return dx

results = check_module(BrokenPool(2), x)
print(format_report(results))             # expected: input ... FAIL
assert not results[0].passed

# %% [markdown]
# **Exercise.** Send the gradient to *every* tied maximum of the first example: what is `dx.sum()` then?
