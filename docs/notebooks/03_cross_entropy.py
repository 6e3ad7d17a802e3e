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
# # Softmax cross-entropy ([docs/cross_entropy.md](../cross_entropy.md))
#
# `dL/dz = (p − onehot(y)) / N` in the plain case; with class weights `w` and label smoothing `ε`,
# `dL/dz = (Σ_c q_c · p − q) / W`.

# %%
import numpy as np
import minicnn
from minicnn import nn
from minicnn.gradcheck import check_loss, format_report
from minicnn.nn import reference as ref

minicnn.engine("textbook")
rng = np.random.default_rng(0)
logits, labels = rng.standard_normal((5, 7)), rng.integers(0, 7, 5)
crit = nn.CrossEntropyLoss()
loss = crit(logits, labels)
p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
print(round(loss, 6) == round(-np.log(p[np.arange(5), labels]).mean(), 6))   # expected: True
assert np.allclose(crit.backward(), (p - np.eye(7)[labels]) / 5)

# %% [markdown]
# The same with weights and smoothing, against the one-sample-at-a-time loop and finite differences:

# %%
w = rng.uniform(0.5, 2, 7)
crit = nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
print(np.isclose(crit(logits, labels), ref.cross_entropy(logits, labels, w, 0.1)))   # expected: True
results = check_loss(crit, logits, labels)
print(format_report(results))            # expected: logits ... pass
assert all(r.passed for r in results)

# %% [markdown]
# ## Break it
# Forget that the mean divides by the total weight:

# %%
class BrokenLoss(nn.CrossEntropyLoss):
    def backward(self, dloss=1.0):
        logp, q, total_w = self._cache
        return q.sum(axis=1, keepdims=True) * np.exp(logp) - q      # BUG: not divided by W

results = check_loss(BrokenLoss(weight=w), logits, labels)
print(format_report(results))            # expected: logits ... FAIL
assert not results[0].passed

# %% [markdown]
# **Exercise.** Compute `log(softmax(z))` in two steps for logits around 1000: what goes wrong, and
# which line of `minicnn/nn/loss.py` prevents it?
