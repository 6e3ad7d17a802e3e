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
# # Distillation ([docs/distillation.md](../distillation.md))
#
# `L = (1 − a) CE(z, y) + a T² KL(p ‖ softmax(z / T))`, so `dL/dz = (1 − a) dCE/dz + a T (s − p) / N`.

# %%
import numpy as np
import minicnn
from minicnn import nn
from minicnn.gradcheck import check_loss, format_report
from minicnn.nn import reference as ref

minicnn.engine("textbook")
rng = np.random.default_rng(0)
logits, labels = rng.standard_normal((5, 7)) * 2, rng.integers(0, 7, 5)
teacher = rng.dirichlet(np.ones(7), 5)          # the teachers' mean softened probabilities
crit = nn.DistillationLoss(temperature=3.0, weight=0.6, label_smoothing=0.1)
loss = crit(logits, labels, teacher)
print(np.isclose(loss, ref.distillation_loss(logits, labels, teacher, 3.0, 0.6, 0.1)))   # expected: True
results = check_loss(crit, logits, labels, teacher_probs=teacher)
print(format_report(results))            # expected: logits ... pass
assert all(r.passed for r in results)

# %% [markdown]
# Why `T²`: a teacher's logits `t` softened at T, and the size of the KL's own gradient `(s − p) / (N T)`
# as T grows. For large T it shrinks like `1 / T²` (both softmaxes near uniform: `s − p ≈ (z − t) / (C T)`);
# times `T²` it stays the same size, so raising the temperature does not hand the loss back to the labels.

# %%
teacher_logits = rng.standard_normal((5, 7)) * 2
for T in (1.0, 2.0, 4.0, 8.0, 16.0):
    p = np.exp(teacher_logits / T) / np.exp(teacher_logits / T).sum(axis=1, keepdims=True)
    only_teacher = nn.DistillationLoss(temperature=T, weight=1.0)
    only_teacher.forward(logits, labels, p)
    with_t2 = np.abs(only_teacher.backward()).sum()
    print(f"T = {T:4}: gradient size {with_t2:.4f} with T^2, {with_t2 / T**2:.6f} without")

# %% [markdown]
# ## Break it
# Forget the `1 / T` that the temperature brings into the softmax's derivative:

# %%
class BrokenDistillation(nn.DistillationLoss):
    def backward(self, dloss=1.0):
        log_s, p, n = self._cache
        T, a = self.temperature, self.weight
        return (1 - a) * self.hard.backward() + (a * T * T / n) * (np.exp(log_s) - p)   # BUG: T^2, not T

results = check_loss(BrokenDistillation(temperature=3.0, weight=0.6), logits, labels, teacher_probs=teacher)
print(format_report(results))            # expected: logits ... FAIL
assert not results[0].passed

# %% [markdown]
# **Exercise.** At `T = 1` and `a = 1`, with a one-hot teacher, which loss is this? Check your answer
# against `nn.CrossEntropyLoss()` (and see `test_identities` in `tests/test_distillation.py`).
