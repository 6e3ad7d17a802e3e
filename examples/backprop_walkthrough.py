"""Backprop through the EmotionClassifier, one textbook layer at a time, checked as it goes.

    python examples/backprop_walkthrough.py

This runs the textbook layers of minicnn/nn -- the code on the docs pages -- and nothing else:
``minicnn.engine("textbook")`` switches the faster engines off (a layer called on its own runs its
textbook code anyway). A batch of 4 built-in faces goes forward through every layer (we print each
output's shape and statistics), then the loss gradient goes backward through the same layers in
reverse. After each layer's backward we check it against finite differences, for dL/dx and for
every parameter gradient: nudge the tensor by a tiny step along a random direction d, rerun that
layer, and compare the change in L = sum(output * upstream gradient) with what the backward
predicted, <gradient, d>. Everything runs in float64 so the finite differences are trustworthy.
"""
import numpy as np

import minicnn
from minicnn.data import EMOTIONS, make_faces, normalize
from minicnn.models import EmotionClassifier
from minicnn.models.emotion import leaf_layers


def directional_check(layer, rng, tensor, d, run, h=1e-6):
    """(L(t + h d) - L(t - h d)) / 2h with L = run(): the numeric derivative along d of the scalar
    that ``run`` computes, with ``tensor`` (an input or a parameter, changed in place) nudged.
    ``rng``: the layer's random state for its forward pass (dropout: the same mask every time)."""
    state = layer.state_dict()                    # (BatchNorm's running statistics change in training)
    saved = tensor.copy()
    tensor += h * d
    layer.set_rng_states(rng)
    plus = run()
    tensor[...] = saved - h * d
    layer.set_rng_states(rng)
    minus = run()
    tensor[...] = saved
    layer.load_state_dict(state)
    layer.set_rng_states(rng)
    return (plus - minus) / (2 * h)


def relative_error(a, b, floor=1e-3):
    """|a - b| relative to the larger of the two, but never to less than ``floor``: finite differences
    of a loss of size ~1 carry rounding noise of about 1e-10, so two derivatives that are both zero up
    to rounding (the conv biases below) agree although their ratio is meaningless."""
    return abs(a - b) / max(abs(a), abs(b), floor)


def main():
    minicnn.engine("textbook")
    print("Running the textbook layers (minicnn/nn), in float64; the engines (minicnn/engines) are off.\n")
    minicnn.manual_seed(0)
    model = EmotionClassifier().double().train()
    faces, labels = make_faces(4, seed=1)
    x = normalize(faces, 0.5, 0.25, dtype=np.float64)
    print(f"input: {x.shape}, labels {[EMOTIONS[i] for i in labels]}\n")

    print("FORWARD: each layer caches what its backward will need")
    layers = list(leaf_layers(model))
    inputs, rng_states, h = [], [], x
    for name, layer in layers:
        inputs.append(h)
        rng_states.append(layer.rng_states())          # dropout: its mask's random state
        h = layer(h)
        print(f"  {name:<14} {type(layer).__name__:<12} -> {str(h.shape):<18} "
              f"mean {h.mean():+.3f}  std {h.std():.3f}  min {h.min():+.3f}  max {h.max():+.3f}")

    criterion = minicnn.nn.CrossEntropyLoss()
    loss = criterion(h, labels)
    g = criterion.backward()
    print(f"\nloss = {loss:.4f} (ln 7 = {np.log(7):.4f} for a network that knows nothing)")
    print(f"dL/dlogits = (softmax - onehot) / N, norm {np.linalg.norm(g):.4f}\n")

    print("BACKWARD: each layer turns dL/d(output) into dL/d(input) and fills its parameters' .grad;")
    print("each is checked along a random direction by finite differences (rel err < 1e-5 is ok)")
    directions = np.random.default_rng(0)
    failures = 0
    for (name, layer), inp, rng in zip(reversed(layers), reversed(inputs), reversed(rng_states)):
        layer.set_rng_states(rng)
        layer(inp)                                      # (the forward pass again, same mask: its cache)
        dx = layer.backward(g)
        grads = {pname: p.grad.copy() for pname, p in layer.named_parameters()}
        checks = []
        d = directions.standard_normal(inp.shape)
        if isinstance(layer, minicnn.nn.MaxPool2d):
            # After a ReLU many inputs are exactly 0, so windows tie and max-pool has no derivative
            # there: move only the positive entries (the zeros' gradient is 0 through the ReLU anyway).
            d *= inp > 0
        x_in = inp.copy()
        numeric = directional_check(layer, rng, x_in, d, lambda: float((layer(x_in) * g).sum()))
        checks.append(("dL/dx", float((dx * d).sum()), numeric))
        for pname, p in layer.named_parameters():
            d = directions.standard_normal(p.shape)
            numeric = directional_check(layer, rng, p.data, d, lambda: float((layer(inp) * g).sum()))
            checks.append((f"dL/d{pname}", float((grads[pname] * d).sum()), numeric))
            p.grad = grads[pname]
        layer.set_rng_states(rng)
        layer(inp)                                      # (restore the cache the backward used)
        words = []
        for what, analytic, numeric in checks:
            err = relative_error(analytic, numeric)
            failures += err >= 1e-5
            words.append(f"{what} {err:.0e} {'ok' if err < 1e-5 else 'FAIL'}")
        print(f"  {name:<14} {type(layer).__name__:<12} |dL/dx| {np.linalg.norm(dx):9.3e}   " + ", ".join(words))
        g = dx

    conv1 = model.features[0]
    print(f"\nWhy is |dL/d bias| of each conv layer about {np.abs(conv1.bias.grad).max():.0e}? A BatchNorm follows it:"
          "\nin training it subtracts the batch mean of each channel, so a constant added to a channel (the"
          "\nconv bias) cancels and cannot change the loss. Its gradient, the sum of dL/d(conv output) over"
          "\nthe channel, is exactly 0 up to rounding (BatchNorm's dL/dx sums to zero per channel).")

    print("\nEvery parameter now holds its gradient in .grad; an optimizer step would use them:")
    opt = minicnn.optim.SGD(model.parameters(), lr=0.01)
    opt.step()
    print(f"after one SGD step (lr 0.01) the loss on the same batch is {criterion(model(x), labels):.4f}"
          f" (was {loss:.4f})")
    if failures:
        raise SystemExit(f"{failures} gradient checks failed")
    print("all gradient checks ok")


if __name__ == "__main__":
    main()
