"""The seed network: a 4-block CNN for 48x48 grayscale faces, 7 emotions (FER2013).

    (N, 1, 48, 48)
    4 x [Conv 3x3 (stride 1, pad 1) -> BatchNorm2d -> ReLU -> MaxPool 2x2]   channels 1->32->64->128->256
    (N, 256, 3, 3) -> Flatten (2304) -> Linear 512 -> ReLU -> Dropout -> Linear 7 -> logits

1,572,551 trainable parameters. Names and layouts match the PyTorch module
below, so state dicts trade both ways (``{k: v.numpy()}`` one way,
``{k: torch.from_numpy(v)}`` the other)::

    features   = Sequential(*block(1, 32), *block(32, 64), *block(64, 128), *block(128, 256))
    classifier = Sequential(Flatten(), Linear(2304, 512), ReLU(), Dropout(0.5), Linear(512, 7))
"""
import numpy as np

from ..backend import to_device
from ..nn import BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, Module, ReLU, Sequential, no_grad
from ..nn.module import check_input

__all__ = ["EmotionClassifier", "EMOTIONS", "leaf_layers", "summary"]

from ..data.fer2013 import EMOTIONS  # noqa: E402  (FER2013's class order, the model's outputs)


def _block(c_in, c_out):
    return [Conv2d(c_in, c_out, 3, stride=1, padding=1), BatchNorm2d(c_out), ReLU(), MaxPool2d(2)]


class EmotionClassifier(Module):
    input_shape = (1, 48, 48)

    def __init__(self, num_classes=7, dropout=0.5):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.features = Sequential(*_block(1, 32), *_block(32, 64), *_block(64, 128), *_block(128, 256))
        self.classifier = Sequential(Flatten(), Linear(256 * 3 * 3, 512), ReLU(), Dropout(dropout),
                                     Linear(512, self.num_classes))
        # Fine-tuning with frozen features: they run in eval mode and keep nothing for backward (the
        # engines' inference route), and backward stops at the classifier.
        object.__setattr__(self, "features_frozen", False)

    def freeze_features(self, frozen=True):
        """Train the classifier only: the features keep their weights and BatchNorm statistics."""
        object.__setattr__(self, "features_frozen", bool(frozen))
        return self

    def train(self, mode=True):
        super().train(mode)
        if self.features_frozen:
            self.features.train(False)
        return self

    @classmethod
    def from_pretrained(cls, num_classes=7, weights=None, dropout=0.5):
        """An EmotionClassifier starting from trained weights (default: the shipped FER2013 ones). With
        another number of classes the features are loaded and the head (classifier.4) starts anew, as
        for fine-tuning to other labels; ``model.load_report`` says what was not loaded."""
        from ..training.checkpoint import CheckpointError, load_checkpoint
        if weights is None:
            from ..weights import default_weights_path
            weights = default_weights_path()
        state, _, _ = load_checkpoint(weights)
        model = cls(num_classes=num_classes, dropout=dropout)
        try:
            report = model.load_state_dict(state, strict=False)
        except ValueError as exc:
            raise CheckpointError(f"{weights}: {exc}") from None
        not_head = [k for k in report.mismatched_keys if not k.startswith("classifier.4.")]
        if not_head or report.missing_keys:
            raise CheckpointError(f"{weights} does not hold this network's features: "
                                  + "; ".join(not_head + report.missing_keys))
        model.load_report = report
        return model

    def forward(self, x):
        check_input(self, x, ("N",) + self.input_shape, self.dtype)
        if self.features_frozen:
            with no_grad():
                h = self.features(x)
            return self.classifier(h)
        return self.classifier(self.features(x))

    def backward(self, dlogits, input_grad=True):
        """Fill every parameter's gradient; return dL/dx (skipped, None, if ``input_grad`` is False)."""
        d = self.classifier.backward(dlogits)
        if self.features_frozen:
            return None
        return self.features.backward(d, input_grad=input_grad)

    def compile_inference(self):
        """An :class:`~minicnn.inference_session.InferenceSession` of this network as it is now: eval-mode
        prediction with BatchNorm folded into the convs, prepared filters and kept memory."""
        from ..inference_session import InferenceSession
        return InferenceSession(self)

    def summary(self, batch_size=None, file=None):
        """Print (and return) a table of each layer's output shape and parameter count."""
        return summary(self, self.input_shape, batch_size=batch_size, file=file)


def leaf_layers(module, prefix=""):
    """(dotted name, layer) for every module without children, in registration order."""
    for name, child in module._modules.items():
        full = f"{prefix}.{name}" if prefix else name
        if child._modules:
            yield from leaf_layers(child, full)
        else:
            yield full, child


def summary(model, input_shape, batch_size=None, file=None):
    """Output shape and parameter count of every layer of a chain-shaped model.

    Runs one zero image through the leaf layers in order, in eval mode (so no
    running statistic changes), and prints a table like the seed's.
    """
    was_training = model.training
    model.eval()
    try:
        x = to_device(np.zeros((1,) + tuple(input_shape), dtype=model.dtype), model.device)
        rows = []
        for name, layer in leaf_layers(model):
            x = layer(x)
            rows.append((name, layer, x, sum(p.size for p in layer._parameters.values())))
    finally:
        model.train(was_training)
    batch = "N" if batch_size is None else str(batch_size)
    lines = []
    header = f"{'Layer (type)':<34}{'Output Shape':>22}{'Param #':>14}"
    lines += ["=" * len(header), header, "=" * len(header)]
    lines.append(f"{'input':<34}{str((batch,) + tuple(input_shape)).replace(chr(39), ''):>22}{0:>14,}")
    total = 0
    for name, layer, y, n_params in rows:
        shape = "(" + ", ".join([batch] + [str(d) for d in y.shape[1:]]) + ")"
        lines.append(f"{name + ' (' + type(layer).__name__ + ')':<34}{shape:>22}{n_params:>14,}")
        total += n_params
    bytes_per = np.dtype(model.dtype).itemsize
    lines += ["=" * len(header),
              f"Total params: {total:,}",
              f"Trainable params: {model.num_parameters():,}",
              f"Non-trainable params: 0 (plus {sum(b.size for _, b in model.named_buffers()):,} "
              f"buffer values: BatchNorm running statistics)",
              f"Parameter size: {total * bytes_per / 2**20:.2f} MB ({np.dtype(model.dtype).name})",
              "=" * len(header)]
    text = "\n".join(lines)
    print(text, file=file)
    return text
