"""Classification metrics: accuracy, confusion matrix, per-class precision / recall / F1."""
import numpy as np

__all__ = ["confusion_matrix", "classification_report", "format_report"]


def confusion_matrix(labels, predictions, num_classes):
    """cm[true, predicted] = count."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(predictions)), 1)
    return cm


def classification_report(labels, predictions, class_names):
    """Accuracy, and per class precision, recall, F1 and support, from the confusion matrix."""
    k = len(class_names)
    cm = confusion_matrix(labels, predictions, k)
    tp = np.diag(cm).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(cm.sum(0) > 0, tp / cm.sum(0), 0.0)
        recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "macro_f1": float(f1.mean()),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(cm[i].sum())}
                      for i, name in enumerate(class_names)},
        "confusion_matrix": cm.tolist(),
    }


def format_report(report, class_names):
    lines = [f"accuracy {report['accuracy']:.2%}   macro F1 {report['macro_f1']:.3f}", "",
             f"{'class':<10}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>9}"]
    for name in class_names:
        r = report["per_class"][name]
        lines.append(f"{name:<10}{r['precision']:>10.3f}{r['recall']:>8.3f}{r['f1']:>8.3f}{r['support']:>9}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * 10 + "".join(f"{n[:7]:>8}" for n in class_names)]
    for name, row in zip(class_names, report["confusion_matrix"]):
        lines.append(f"{name:<10}" + "".join(f"{v:>8}" for v in row))
    return "\n".join(lines)
