"""Backprop through the EmotionClassifier, one layer at a time, checked as it goes.

    python examples/backprop_walkthrough.py

A batch of 4 built-in faces goes forward through every layer (we print each
output's shape and statistics), then the loss gradient goes backward through
the same layers in reverse (we print each gradient's norm). After each layer's
backward we check it against finite differences: nudge the layer's input by a
tiny step along a random direction, rerun that layer, and compare the change
in sum(output * upstream gradient) with what our backward predicted.
Everything runs in float64 so the finite differences are trustworthy.
"""
import numpy as np

import minicnn
from minicnn.data import EMOTIONS, make_faces, normalize
from minicnn.models import EmotionClassifier
from minicnn.models.emotion import leaf_layers


def directional_check(layer, x, dout, d, h=1e-6):
    """(L(x + h d) - L(x - h d)) / 2h, the numeric derivative along d, with L = sum(layer(x) * dout)."""
    state = layer.rng_states()                     # dropout: the same mask every time
    def L(z):
        layer.set_rng_states(state)
        return float((layer(z) * dout).sum())
    numeric = (L(x + h * d) - L(x - h * d)) / (2 * h)
    layer.set_rng_states(state)
    layer(x)                                       # restore the cache for the real backward
    layer.set_rng_states(state)
    return numeric


def main():
    minicnn.manual_seed(0)
    model = EmotionClassifier().double().train()
    faces, labels = make_faces(4, seed=1)
    x = normalize(faces, 0.5, 0.25, dtype=np.float64)
    print(f"input: {x.shape}, labels {[EMOTIONS[i] for i in labels]}\n")

    print("FORWARD: each layer caches what its backward will need")
    layers = list(leaf_layers(model))
    inputs, h = [], x
    for name, layer in layers:
        inputs.append(h)
        state = layer.rng_states()
        h = layer(h)
        layer._walk_state = state                  # remember the dropout mask's random state
        print(f"  {name:<14} {type(layer).__name__:<12} -> {str(h.shape):<18} "
              f"mean {h.mean():+.3f}  std {h.std():.3f}  min {h.min():+.3f}  max {h.max():+.3f}")

    criterion = minicnn.nn.CrossEntropyLoss()
    loss = criterion(h, labels)
    g = criterion.backward()
    print(f"\nloss = {loss:.4f} (ln 7 = {np.log(7):.4f} for a network that knows nothing)")
    print(f"dL/dlogits = (softmax - onehot) / N, norm {np.linalg.norm(g):.4f}\n")

    print("BACKWARD: each layer turns dL/d(output) into dL/d(input), checked by finite differences")
    for (name, layer), inp in zip(reversed(layers), reversed(inputs)):
        layer.set_rng_states(layer._walk_state)
        d = np.random.default_rng(0).standard_normal(inp.shape)
        if isinstance(layer, minicnn.nn.MaxPool2d):
            # After a ReLU many inputs are exactly 0, so windows tie and max-pool has no derivative
            # there: move only the positive entries (the zeros' gradient is 0 through the ReLU anyway).
            d *= inp > 0
        numeric = directional_check(layer, inp, g, d)
        dx = layer.backward(g)
        analytic = float((dx * d).sum())
        err = abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-12)
        grads = ", ".join(f"|d{p}| {np.linalg.norm(par.grad):.3g}" for p, par in layer.named_parameters())
        print(f"  {name:<14} {type(layer).__name__:<12} |dL/dx| {np.linalg.norm(dx):9.3e}   "
              f"check: rel err {err:.1e} {'ok' if err < 1e-5 else 'FAIL'}" + (f"   {grads}" if grads else ""))
        g = dx
    print("\nEvery parameter now holds its gradient in .grad; an optimizer step would use them:")
    opt = minicnn.optim.SGD(model.parameters(), lr=0.01)
    opt.step()
    print(f"after one SGD step (lr 0.01) the loss on the same batch is {criterion(model(x), labels):.4f}"
          f" (was {loss:.4f})")


if __name__ == "__main__":
    main()
