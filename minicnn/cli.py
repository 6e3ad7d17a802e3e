"""The ``minicnn`` command.

    minicnn train [--data PATH] [--epochs N] [--out DIR] [--resume] ...   train the EmotionClassifier
    minicnn finetune --data DIR [--freeze features] ...                    fine-tune to your own classes
    minicnn evaluate [--weights FILE] [--data PATH] [--tta]                 metrics and confusion matrix
    minicnn predict IMAGE|DIR... [--json] [--annotate OUT]                  every face in photos, classified
    minicnn video SOURCE --out OUT.mp4                                      faces in a video or camera, labelled
    minicnn summary                                                         layers, shapes, parameters
    minicnn gradcheck [--path textbook|cpu|gpu]                             the textbook and every engine, checked
    minicnn explain IMAGE / minicnn visualize [IMAGE]                       saliency, Grad-CAM, filters, maps
    minicnn bench [--quick] ...                                             minicnn vs PyTorch on this machine
    minicnn bench --distributed                                             1 vs 2 data-parallel ranks, all-reduce cost
    minicnn cache [--clear]                                                 where compiled kernels and data are cached

Without ``--data`` the dataset is taken from ``$MINICNN_DATA``; if that is not
set either, the built-in synthetic faces are used (and the run says so).
"""
import argparse
import dataclasses
import json
import os
import sys
import time



def _add_common(p, data=True):
    if data:
        p.add_argument("--data", default=None,
                       help="FER2013 folder (train/, test/) or fer2013.csv; default: $MINICNN_DATA, "
                            "else the built-in synthetic faces")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])


def _cmd_train(args):
    if args.cuda_graph and args.device != "gpu":
        print("minicnn: error: --cuda-graph needs --device gpu (CUDA graphs replay GPU work)", file=sys.stderr)
        return 2
    from .distributed.comm import world_size_from_environment
    ranks = world_size_from_environment()
    if ranks > 1 and not args.distributed:
        print(f"minicnn: error: this is one of {ranks} processes started by mpiexec, but --distributed was not "
              f"given: {ranks} independent runs would overwrite each other's checkpoints in {args.out}. Add "
              "--distributed for one data-parallel run, or start a single process without mpiexec",
              file=sys.stderr)
        return 2
    if not args.distributed:
        return _train(args)
    if args.cuda_graph:
        print("minicnn: error: --cuda-graph with --distributed is not supported yet (the graph would have to "
              "capture the all-reduce): train without --cuda-graph", file=sys.stderr)
        return 2
    from .distributed import init
    comm = init(args.device)
    try:
        return _train(args, comm)
    except BaseException as exc:          # any failure ends every rank, never a job left hanging
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        print(f"minicnn: error (rank {comm.rank} of {comm.size}): {what}; ending the job", file=sys.stderr)
        sys.stderr.flush()
        comm.abort(130 if isinstance(exc, KeyboardInterrupt) else 2)
        raise


def recipe_from_args(args, builtin=False):
    """The Recipe a train/finetune command line asks for: the named recipe (--recipe), then every
    option given explicitly on top of it (every value checked before any work)."""
    from .data import Augment
    from .training import Recipe
    from .training.trainer import PRESETS
    finetune = getattr(args, "finetune", False)
    defaults = Recipe()
    tuning = {}
    if finetune:
        tuning = dict(init=os.path.abspath(_weights_path(args.weights)), freeze=args.freeze,
                      features_lr_scale=args.features_lr_scale)
    preset = dict(PRESETS[args.recipe])
    epochs = args.epochs if args.epochs is not None else preset.pop(
        "epochs", 15 if finetune else 4 if builtin else defaults.epochs)
    preset.pop("epochs", None)
    augment = dict(preset.pop("augment", None) or dataclasses.asdict(Augment(erase=0.0)))
    if args.erase is not None:
        augment["erase"] = args.erase
    given = {k: v for k, v in dict(batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                                   weight_decay=args.weight_decay, schedule=args.schedule,
                                   label_smoothing=args.label_smoothing, clip_grad_norm=args.clip_grad_norm,
                                   ema=args.ema).items()
             if v is not None}
    distill = {k: v for k, v in dict(distill_weight=args.distill_weight,
                                     distill_temperature=args.distill_temperature).items() if v is not None}
    if args.teacher:
        distill["teachers"] = [os.path.abspath(t) for t in args.teacher]
    elif distill:
        raise ValueError("--distill-weight and --distill-temperature need --teacher WEIGHTS (the network to learn from)")
    given.update(distill)
    if finetune and "lr" not in given and "lr" not in preset:
        given["lr"] = 0.01
    return Recipe(**dict(preset, **given), epochs=epochs, seed=args.seed,
                  augment=None if args.no_augment else augment, **tuning)


def _train(args, comm=None):
    """Train (or fine-tune); ``comm``: this rank's communicator in a data-parallel run (rank 0 alone
    prints and writes the report and pictures)."""
    speaks = comm is None or comm.rank == 0

    def say(*parts):
        if speaks:
            print(*parts, file=sys.stderr)
    from .data import EMOTIONS, load_dataset
    from .extras import available
    from .training import Trainer, format_report
    from .training.plots import plot_confusion, plot_curves, plot_samples
    finetune = getattr(args, "finetune", False)
    builtin = (args.data or os.environ.get("MINICNN_DATA")) is None
    recipe = recipe_from_args(args, builtin)
    pictures = available("matplotlib")
    if not pictures:
        say("minicnn: matplotlib is not installed, so this run writes no pictures (curves, confusion matrix, "
            "samples): pip install 'minicnn[plots]'")
    data, desc = load_dataset(args.data, val_fraction=args.val_fraction, seed=args.seed,
                              classes="any" if finetune else EMOTIONS)
    say(f"data: {desc}: {len(data['train'][1])} train / {len(data['val'][1])} validation / "
        f"{len(data['test'][1])} test images")
    if builtin:
        say("no --data or $MINICNN_DATA given: training on the built-in synthetic faces (see the README for FER2013)")
    options = dict(out_dir=args.out, device=args.device, data_description=desc, progress=not args.no_progress,
                   cuda_graph=args.cuda_graph, overwrite=args.overwrite)
    if comm is None:
        trainer = Trainer(data, recipe, **options)
    else:
        from .distributed import DistributedTrainer
        trainer = DistributedTrainer(data, recipe, comm=comm, bn=args.bn, **options)
    t0 = time.perf_counter()
    try:
        trainer.fit(resume=args.resume)
    except KeyboardInterrupt:
        return 130
    minutes = (time.perf_counter() - t0) / 60
    report = trainer.evaluate("test", tta=args.tta)         # (a data-parallel run: sharded over the ranks)
    probs = report.pop("probs")
    if not speaks:
        return 0
    which = "best-by-validation" if trainer.validating else "the last epoch's (no validation split)"
    print(f"\ntest split ({'with' if args.tta else 'no'} test-time augmentation), {which} weights:")
    classes = trainer.classes
    print(format_report(report, classes))
    with open(os.path.join(args.out, "test_report.json"), "w") as f:
        json.dump(dict(report, tta=args.tta, train_minutes=minutes), f, indent=1)
    written = "best.npz, last.npz, log.jsonl"
    if pictures:
        plot_curves(os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "curves.png"))
        plot_confusion(report["confusion_matrix"], classes, os.path.join(args.out, "confusion.png"),
                       title=f"test accuracy {report['accuracy']:.1%}")
        x, y = data["test"]
        plot_samples(x, y, probs, classes, os.path.join(args.out, "samples.png"))
        written += ", curves.png, confusion.png, samples.png"
    print(f"\ntest accuracy {report['accuracy']:.2%} after {trainer.epoch} epochs, {minutes:.1f} minutes; "
          f"wrote {args.out}/{written}", file=sys.stderr)
    return 0


def _weights_path(arg):
    if arg:
        return arg
    from .weights import default_weights_path
    return default_weights_path()


def _cmd_evaluate(args):
    from .data import EMOTIONS, DatasetError, load_dataset
    from .training import classification_report, format_report, load_model, predict_proba
    from .training.plots import plot_confusion
    path = _weights_path(args.weights)
    model, meta = load_model(path, args.device)
    classes = tuple(meta.get("classes") or EMOTIONS)
    data, desc = load_dataset(args.data, val_fraction=args.val_fraction, seed=args.seed, classes=classes)
    if tuple(c.lower() for c in data["classes"]) != tuple(c.lower() for c in classes):
        raise DatasetError(f"the data's classes ({', '.join(data['classes'])}) are not the model's "
                           f"({', '.join(classes)})")
    x, y = data[args.split]
    norm = meta["normalization"]
    probs = predict_proba(model, x, norm["mean"], norm["std"], tta=args.tta, device=args.device,
                          session=model.compile_inference())
    report = classification_report(y, probs.argmax(1), classes)
    print(f"weights: {path}\ndata: {desc}, split '{args.split}' ({len(y)} images), "
          f"test-time augmentation {'on' if args.tta else 'off'}\n")
    print(format_report(report, classes))
    if args.out:
        from .extras import available
        os.makedirs(args.out, exist_ok=True)
        written = [os.path.join(args.out, f"report_{args.split}.json")]
        with open(written[0], "w") as f:
            json.dump(report, f, indent=1)
        if available("matplotlib"):
            written.append(os.path.join(args.out, f"confusion_{args.split}.png"))
            plot_confusion(report["confusion_matrix"], classes, written[-1],
                           title=f"{args.split} accuracy {report['accuracy']:.1%}")
        else:
            print("minicnn: no confusion-matrix picture without matplotlib: pip install 'minicnn[plots]'",
                  file=sys.stderr)
        print(f"\nwrote {', '.join(written)}")
    return 0


def _cmd_predict(args):
    """Every face in each image (a folder: every image under it), classified. A file that cannot be
    read is reported and skipped, the others are still done, and the exit code is 1 when any failed."""
    from .data import DatasetError
    from .faces import FaceReader, draw_faces, iter_images
    reader = FaceReader(_weights_path(args.weights), device=args.device)
    if args.annotate:
        os.makedirs(args.annotate, exist_ok=True)
    failed = total = 0
    for path in iter_images(args.images):
        total += 1
        try:
            _, faces = reader.read_image(path, whole=args.whole)
        except (DatasetError, OSError) as exc:
            failed += 1
            print(f"minicnn: error: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"image": path, "faces": [f.as_dict() for f in faces]}), flush=True)
        else:
            print(f"{path}: " + (f"{len(faces)} face{'s' if len(faces) != 1 else ''}" if faces else "no face found"))
            for i, face in enumerate(faces):
                order = sorted(face.probabilities, key=lambda k: -face.probabilities[k])
                print(f"  face {i + 1} at {list(face.box)}: {face.label}")
                for name in order:
                    print(f"    {name:<9}{face.probabilities[name]:7.1%}")
        if args.annotate:
            from PIL import Image
            from .data.images import decode_rgb
            rgb = decode_rgb(path)
            name = os.path.splitext(os.path.basename(path))[0] + "_faces.png"
            Image.fromarray(draw_faces(rgb, faces)).save(os.path.join(args.annotate, name))
    if total == 0:
        print("minicnn: error: no images found in " + ", ".join(args.images), file=sys.stderr)
        return 2
    if failed:
        print(f"minicnn: {failed} of {total} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def _cmd_video(args):
    from .faces import FaceReader, label_video
    reader = FaceReader(_weights_path(args.weights), device=args.device)
    label_video(args.source, args.out, reader=reader, show=args.show, smooth=args.smooth,
                log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {args.out}")
    return 0


def _cmd_gradcheck(args):
    from .gradcheck import available_paths, check_all, format_report
    available = available_paths()
    if args.path:
        paths = list(dict.fromkeys(args.path))
        missing = [f"{p}: {available[p]}" for p in paths if available[p]]
        if missing:
            print("minicnn: error: cannot check " + "; ".join(missing), file=sys.stderr)
            return 2
    else:
        paths = [p for p, why in available.items() if why is None]
    print("checks: the textbook layers (minicnn/nn) against float64 finite differences; each engine "
          "(minicnn/engines) against the textbook layers: output, dL/dx, every parameter gradient, running "
          "statistics")
    for p, why in available.items():
        if p not in paths:
            print(f"  not checked: {p}" + (f" ({why})" if why else " (not asked for)"))
    results = check_all(device=args.device, include_model=not args.layers_only, paths=paths)
    print(format_report(results))
    failed = [r for r in results if not r.passed]
    counts = ", ".join(f"{p} {sum(1 for r in results if r.path == p)}" for p in paths)
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed   (rows: {counts})")
    for r in failed:
        print(f"FAIL {r}")
    return 1 if failed else 0


def _load_one_face(path, weights, device):
    from .inference import EmotionPredictor, load_face
    predictor = EmotionPredictor(_weights_path(weights), device=device)
    face = load_face(path)
    return predictor, face


def _cmd_explain(args):
    from .explain import plot_explanation, saliency_and_gradcam
    predictor, face = _load_one_face(args.image, args.weights, args.device)
    probs, target, sal, cam = saliency_and_gradcam(predictor.model, predictor.input_tensor(face))
    name = os.path.splitext(os.path.basename(args.image))[0] + "_explain.png"
    out = os.path.join(args.out, name) if args.out and os.path.isdir(args.out) else (args.out or name)
    plot_explanation(face, probs, target, sal, cam, predictor.classes, out)
    print(f"{args.image}: {predictor.classes[target]} ({probs[target]:.1%}); wrote {out}")
    return 0


def _cmd_visualize(args):
    from .explain import feature_maps, first_layer_filters, plot_filters_and_maps
    if args.image:
        predictor, face = _load_one_face(args.image, args.weights, args.device)
    else:
        from .data import make_faces
        from .inference import EmotionPredictor
        predictor = EmotionPredictor(_weights_path(args.weights), device=args.device)
        face = make_faces(1, seed=0, labels=[3])[0][0]
    maps = feature_maps(predictor.model, predictor.input_tensor(face))
    out = os.path.join(args.out, "filters_and_maps.png") if os.path.isdir(args.out) else args.out
    plot_filters_and_maps(first_layer_filters(predictor.model), maps, face, out)
    print(f"wrote {out}")
    return 0


def _cmd_export(args):
    if not args.out and not args.onnx:
        print("minicnn: error: say what to write: --out BASE (weights and card) and/or --onnx FILE", file=sys.stderr)
        return 2
    checkpoint = _weights_path(args.checkpoint)
    if args.onnx:
        from .onnx_export import export_onnx
        info = export_onnx(checkpoint, args.onnx)
        print(f"wrote {args.onnx}: ONNX opset 17, input 'input' float32 (N, 1, 48, 48), output 'logits' "
              f"(N, {len(info['classes'])}); classes and normalisation in its metadata")
    if args.out:
        from .training.export import export_weights
        card = export_weights(checkpoint, args.out, report=args.report,
                              extra={"machine": args.machine} if args.machine else None)
        acc = card.get("test", {}).get("accuracy")
        print(f"wrote {args.out}.npz and {args.out}.json" + (f" (test accuracy {acc:.2%})" if acc else ""))
    return 0


def _cmd_bench(args):
    if "--faces" in args.bench_args:
        from .benchmarks.faces import main as faces_main
        return faces_main([a for a in args.bench_args if a != "--faces"])
    if "--distributed" in args.bench_args:
        from .benchmarks.distributed import main as distributed_main
        return distributed_main([a for a in args.bench_args if a != "--distributed"])
    if "--video" in args.bench_args:
        from .benchmarks.video import main as video_main
        return video_main([a for a in args.bench_args if a != "--video"])
    from .benchmarks.run import main as bench_main
    return bench_main(args.bench_args)


def _cmd_cache(args):
    from .data.fer2013 import cache_dir
    from .engines import kernel_cache
    places = [("compiled CPU kernels (numba)", kernel_cache.location()), ("decoded datasets", cache_dir())]
    for what, path in places:
        size = kernel_cache.folder_size(path)
        print(f"{what}: {path} ({size / 2**20:.1f} MB)" if size is not None else f"{what}: {path} (empty)")
    if args.clear:
        kernel_cache.clear()
        import shutil
        if os.path.isdir(cache_dir()):
            shutil.rmtree(cache_dir())
        print("cleared: the kernels compile again on first use (about a minute on 2 cores), datasets decode again")
    return 0


def _cmd_summary(args):
    from .models import EmotionClassifier
    EmotionClassifier(num_classes=args.num_classes).summary()
    return 0


def build_parser():
    from .training.schedules import SCHEDULES
    from .training.trainer import PRESETS
    from . import __version__
    parser = argparse.ArgumentParser(prog="minicnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"minicnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for name in ("train", "finetune"):
        if name == "train":
            p = sub.add_parser("train", help="train the EmotionClassifier (built-in faces or FER2013)")
            _add_common(p)
        else:
            p = sub.add_parser("finetune", help="fine-tune the FER2013 features to your own classes "
                                                "(--data DIR with train/<class>/ and test/<class>/)")
            p.add_argument("--data", required=True, help="folder with train/<class>/*.jpg and test/<class>/*.jpg")
            p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
            p.add_argument("--weights", default=None, help="start from these weights (default: the shipped ones)")
            p.add_argument("--freeze", default="none", choices=["none", "features"],
                           help="features: train the classifier only (fast on a CPU)")
            p.add_argument("--features-lr-scale", type=float, default=0.1,
                           help="without --freeze: the features' rate as a fraction of --lr (default 0.1)")
        p.add_argument("--recipe", default="default", choices=list(PRESETS),
                       help="a named recipe (the other options change it): default, or fer2013-long (120 epochs, "
                            "plateau then cosine, stronger augmentation; see minicnn/training/trainer.py)")
        p.add_argument("--epochs", type=int, default=None,
                       help="default: the recipe's (50 on FER2013, 4 on the built-in faces; finetune: 15)")
        p.add_argument("--batch-size", type=int, default=None, help="default 64")
        p.add_argument("--lr", type=float, default=None, help="default 0.02 (finetune: 0.01)")
        p.add_argument("--optimizer", default=None, choices=["sgd", "adam", "adamw"],
                       help="sgd (the default) is Nesterov momentum 0.9")
        p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4")
        p.add_argument("--schedule", default=None, choices=list(SCHEDULES), help="default cosine")
        p.add_argument("--label-smoothing", type=float, default=None, help="default 0.1")
        p.add_argument("--clip-grad-norm", type=float, default=None, help="default 5; 0 turns clipping off")
        p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                       help="validate, keep and ship a moving average of the weights with this decay per step "
                            "(e.g. 0.999; default: the recipe's, 0: off)")
        p.add_argument("--teacher", action="append", default=None, metavar="WEIGHTS",
                       help="distill: also learn from this trained network's softened probabilities on each "
                            "augmented batch (repeat for an ensemble: their mean is the target)")
        p.add_argument("--distill-weight", type=float, default=None,
                       help="with --teacher: the teachers' share of the loss (default 0.5; the labels get the rest)")
        p.add_argument("--distill-temperature", type=float, default=None,
                       help="with --teacher: the temperature that softens teacher and student alike (default 2)")
        p.add_argument("--no-augment", action="store_true", help="no crop/flip/affine/erasing")
        p.add_argument("--erase", type=float, default=None,
                       help="probability of random erasing (default: the recipe's; 0 for default)")
        p.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of Training held out for validation when the source has no PublicTest split; "
                            "0: train on all of it for the recipe's epochs, no selection (the last epoch is kept)")
        p.add_argument("--tta", action="store_true", help="test-time augmentation in the final evaluation")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default="runs/emotion" if name == "train" else "runs/finetune",
                       help="folder for checkpoints, log and plots")
        p.add_argument("--resume", action="store_true", help="continue from OUT/last.npz (same recipe and data)")
        p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT (default: refuse)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--cuda-graph", action="store_true",
                       help="with --device gpu: replay each training step as a CUDA graph (same results, less overhead)")
        p.add_argument("--distributed", action="store_true",
                       help="one data-parallel run over the processes started by mpiexec (the [distributed] "
                            "extra): mpiexec -n N minicnn train --distributed; --batch-size is the global batch")
        p.add_argument("--bn", default="local", choices=["local", "sync"],
                       help="with --distributed: BatchNorm statistics of each rank's slice (local, the default) "
                            "or of the global batch (sync: the same as one process)")
        p.set_defaults(func=_cmd_train, finetune=name == "finetune")


    p = sub.add_parser("evaluate", help="accuracy, per-class metrics and confusion matrix")
    _add_common(p)
    p.add_argument("--weights", default=None, help="checkpoint or weights .npz (default: the shipped FER2013 weights)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--tta", action="store_true", help="average over flips and small shifts")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the confusion-matrix PNG and JSON report")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="find the faces in photos (files or folders) and classify each")
    _add_common(p, data=False)
    p.add_argument("images", nargs="+", help="image files or folders (walked)")
    p.add_argument("--json", action="store_true", help="one JSON object per line per image")
    p.add_argument("--annotate", default=None, metavar="OUT_DIR", help="write each image with its faces drawn")
    p.add_argument("--whole", action="store_true",
                   help="classify each image's central square as one face (no face detection)")
    p.add_argument("--weights", default=None, help="default: the shipped FER2013 weights")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("video", help="faces in a video file or a camera, boxed and labelled, to an .mp4")
    _add_common(p, data=False)
    p.add_argument("source", help="a video file, or a camera index (0 is the first camera)")
    p.add_argument("--out", required=True, help="the .mp4 to write (same size and frame rate)")
    p.add_argument("--show", action="store_true", help="show the labelled frames live (q quits)")
    p.add_argument("--smooth", type=float, default=0.4,
                   help="weight of each new frame in a face's moving average (1: no smoothing)")
    p.add_argument("--weights", default=None, help="default: the shipped FER2013 weights")
    p.set_defaults(func=_cmd_video)

    p = sub.add_parser("gradcheck", help="the textbook layers against finite differences, every engine "
                                          "against the textbook layers")
    p.add_argument("--path", action="append", choices=["textbook", "cpu", "gpu"],
                   help="check only this path (repeatable): the textbook layers, the CPU engine or the GPU engine; "
                        "default: the textbook and every engine available here")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                   help="where the textbook rows run (default cpu; engines run on their own device)")
    p.add_argument("--layers-only", action="store_true", help="skip the whole-model checks")
    p.set_defaults(func=_cmd_gradcheck)

    p = sub.add_parser("explain", help="saliency map and Grad-CAM for a face image, as a PNG")
    _add_common(p, data=False)
    p.add_argument("image")
    p.add_argument("--weights", default=None, help="default: the shipped FER2013 weights")
    p.add_argument("--out", default=None, help="PNG to write, or a folder to write IMAGE_explain.png into "
                                               "(default: IMAGE_explain.png here)")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("visualize", help="first-layer filters and a face's feature maps, as a PNG")
    _add_common(p, data=False)
    p.add_argument("image", nargs="?", default=None, help="a face image (default: a built-in face)")
    p.add_argument("--weights", default=None, help="default: the shipped FER2013 weights")
    p.add_argument("--out", default="filters_and_maps.png")
    p.set_defaults(func=_cmd_visualize)

    p = sub.add_parser("export", help="shippable weights and card from a checkpoint, or an ONNX graph")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint or weights .npz (default: the shipped FER2013 weights)")
    p.add_argument("--out", default=None, help="path without extension (writes OUT.npz and OUT.json)")
    p.add_argument("--onnx", default=None, help="write the model as ONNX to this file (the [onnx] extra)")
    p.add_argument("--report", default=None, help="test_report.json of the run, for the card")
    p.add_argument("--machine", default=None, help="where it was trained, for the card")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="minicnn against PyTorch on this machine (minicnn bench --help)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("cache", help="where minicnn caches compiled kernels and decoded datasets")
    p.add_argument("--clear", action="store_true", help="delete both caches")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("summary", help="print the EmotionClassifier's layers, shapes and parameters")
    p.add_argument("--num-classes", type=int, default=7)
    p.set_defaults(func=_cmd_summary)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:            # (its options are the benchmark's own, --help included)
        return _cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    from .backend import DeviceError
    from .data import DatasetError
    from .extras import MissingExtra
    from .training import CheckpointError, TrainingDiverged
    try:
        return args.func(args)
    except (DeviceError, DatasetError, CheckpointError, TrainingDiverged, MissingExtra, ValueError) as exc:
        print(f"minicnn: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:                # a full disk, a folder that is a file, no permission, ...
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"minicnn: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
