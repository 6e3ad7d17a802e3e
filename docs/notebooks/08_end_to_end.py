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
# # End to end: build, check, train, look ([docs/emotion_classifier.md](../emotion_classifier.md))
#
# The EmotionClassifier, built from the textbook layers; checked against finite differences and the
# engines against it; trained for a few steps on the built-in faces; then what the shipped FER2013
# weights look at.

# %%
# %matplotlib inline
import numpy as np
import minicnn
from minicnn.data import make_faces, normalize
from minicnn.gradcheck import check_all, format_report
from minicnn.models import EmotionClassifier

minicnn.manual_seed(0)
model = EmotionClassifier()
text = model.summary()                  # expected: ... Total params: 1,572,551

# %% [markdown]
# ## Check
# The textbook layers against finite differences, and the CPU engine (what `minicnn train` runs on the
# CPU) against the textbook: one table, a row per tensor, the path in the first column.

# %%
results = check_all(paths=["textbook", "cpu"], include_model=False)
print(format_report([r for r in results if "Conv2d 3x3" in r.layer or "conv block, Winograd" == r.layer]))
print(sum(r.passed for r in results), "of", len(results), "pass")   # expected: all pass
assert all(r.passed for r in results)

# %% [markdown]
# ## Train a few steps
# One step is forward, loss, `model.backward`, an SGD update. With the CPU engine on (the default,
# `minicnn.engine("auto")`) the same step runs the fused, threaded conv blocks.

# %%
minicnn.engine("auto")
faces, labels = make_faces(256, seed=1)
x = normalize(faces, 0.5, 0.25)
criterion = minicnn.nn.CrossEntropyLoss()
opt = minicnn.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
losses = []
for step in range(12):
    batch = slice(64 * (step % 4), 64 * (step % 4 + 1))
    loss = criterion(model(x[batch]), labels[batch])
    model.backward(criterion.backward(), input_grad=False)
    opt.step(); opt.zero_grad()
    losses.append(loss)
print([round(v, 2) for v in losses])     # expected: from about ln 7 = 1.95 downwards
assert np.mean(losses[-4:]) < np.mean(losses[:4])

# %% [markdown]
# ## Look
# Saliency and Grad-CAM of the shipped FER2013 weights on a built-in "happy" face, and the first layer's
# filters with feature maps. The plot functions return matplotlib figures; a notebook shows them.

# %%
from minicnn.explain import (feature_maps, first_layer_filters, plot_explanation, plot_filters_and_maps,
                             saliency_and_gradcam)
from minicnn.inference import EmotionPredictor

predictor = EmotionPredictor()           # the shipped weights and their normalisation
face = make_faces(1, seed=0, labels=[3])[0][0]
probs, target, sal, cam = saliency_and_gradcam(predictor.model, predictor.input_tensor(face))
fig = plot_explanation(face, probs, target, sal, cam, predictor.classes)
print(predictor.classes[target], [ax.get_title() for ax in fig.axes][:3])
fig

# %%
fig = plot_filters_and_maps(first_layer_filters(predictor.model),
                            feature_maps(predictor.model, predictor.input_tensor(face)), face)
fig
