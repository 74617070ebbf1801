"""Base configuration: GFA-DEEP SmallCNN on CIFAR-10. Every variant overrides this one.

Override any field from the command line: ``python train.py --config configs/default.py
--config.beta=0.5 --config.data_dir=/data``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # --- Model -----------------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn"  # gfa_jax.models.MODELS key: small_cnn | mlp | resnet20 | vit.
  # Per-channel normalisation inside the model, (x - mean) / std on [0, 1] images. 0.5/0.5
  # maps to [-1, 1], the input scaling the paper trained and aligned at layer0.
  config.model.mean = (0.5, 0.5, 0.5)
  config.model.std = (0.5, 0.5, 0.5)

  # --- Data ------------------------------------------------------------------------------
  # 'cifar10' (full CIFAR-10 in any format found: data_dir, else $GFA_DATA_DIR, $TFDS_DATA_DIR,
  # ~/tensorflow_datasets; none found is an error, never the subset), 'cifar10_bin',
  # 'cifar10_py', 'tfds', 'embedded' (the shipped 2,000/500-image subset), 'fashion_mnist'
  # (IDX files; configs/fashion_mnist_mlp.py) or 'auto' (cifar10, else the subset with a warning).
  config.data_source = "cifar10"
  config.data_dir = ""  # Folder holding cifar-10-batches-bin/-py or a TFDS copy.
  # Let TFDS download CIFAR-10 (~170 MB) into the first place searched when no copy is found.
  config.download = False
  config.crop_padding = 4  # Random-crop augmentation: pad by this many pixels (0: off).
  config.flip = True  # Random horizontal flips.
  config.num_train = 0  # Use only the first N training images (0: all of them).

  # --- Objective -------------------------------------------------------------------------
  config.objective = "gfa"  # standard | gfa | pgd_at | trades | gradalign.
  config.task_loss = "mse"  # mse (the paper's) | ce.
  config.mse_outputs = "softmax"  # MSE compares one-hot labels with softmax or logits.
  config.alpha = 1.0  # Weight of the task loss in alpha * task_loss + beta * penalty.
  config.beta = 0.1  # Weight of the GFA penalty (1 - mean alignment); see docs for sweeps.
  # beta schedule: 0 for the first beta_ramp_start_epochs, then linear up to beta over
  # beta_ramp_epochs (both 0: constant beta). Lets the task be learnt before aligning.
  config.beta_ramp_start_epochs = 0.0
  config.beta_ramp_epochs = 0.0
  config.gfa_layers = ("layer0", "layer1", "layer2")  # DEEP; FIRST is ("layer0",).
  # Per-layer beta: one multiplier of beta per gfa_layers entry, () for all 1. The penalty is
  # mean_l w_l * (1 - alignment_l); (1.0, 0.5, 0.25) weighs the input twice as much as layer1.
  config.gfa_layer_weights = ()
  config.gfa_eps = 1e-12  # Floor of the cosine's denominator.
  # Readings of the paper (gfa_jax.penalty): exact | detached (dL/dh a constant, as PyTorch's
  # autograd.grad without create_graph); align | anti (alpha*MSE - beta*(1 - cos) read
  # literally: cosines pushed to -1); mean | sum of the layers' terms.
  config.gfa_gradient = "exact"
  config.gfa_direction = "align"
  config.gfa_reduction = "mean"
  # Inner attack of pgd_at / trades / gradalign (Linf, in [0, 1] pixel units).
  config.adversary = ml_collections.ConfigDict()
  config.adversary.eps = 8 / 255  # Radius of the Linf ball.
  config.adversary.steps = 7  # PGD steps (PGD-AT, TRADES).
  config.adversary.step_size = 2 / 255  # PGD step size.
  config.adversary.trades_beta = 6.0  # TRADES robustness weight (Zhang et al. 2019).
  config.adversary.gradalign_lambda = 0.2  # GradAlign weight for eps 8/255 (their paper).

  # --- Optimisation ----------------------------------------------------------------------
  config.optimizer = "adam"  # adam | sgd (momentum 0.9).
  config.nesterov = False  # SGD only: Nesterov momentum instead of heavy-ball (PyTorch's default).
  config.learning_rate = 1e-3  # Peak learning rate.
  config.schedule = "cosine"  # constant | cosine (decay to 0 after warm-up).
  config.warmup_epochs = 0.0  # Linear warm-up length in epochs.
  # AdamW: decoupled weight decay; SGD: L2 added to the gradient (PyTorch's weight_decay).
  config.weight_decay = 0.0
  config.grad_clip_norm = 0.0  # Clip gradients to this global norm (0: off).
  config.batch_size = 128  # Global batch, split over all devices (must divide evenly).
  config.num_epochs = 30  # Training length.
  config.seed = 0  # Seeds the parameters, the data order and the augmentation.
  # float32 | bfloat16: the training step's convolutions and matmuls in bfloat16 (parameters,
  # optimiser, activations, GFA's cosines and the loss stay float32). Models with a dtype field
  # only (small_cnn, mlp, resnet20, vit). Evaluation and attacks always run float32: attack
  # steps of 1/255 and min-norm searches need more than bfloat16's ~3 significant digits.
  config.compute_dtype = "float32"

  # --- Logging, evaluation, checkpoints --------------------------------------------------
  config.log_every_steps = 50  # Train metrics to metrics.jsonl every this many steps.
  config.eval_every_steps = 1000  # Test accuracy and per-layer alignment (0: only at end).
  config.eval_batch_size = 500  # Batch for evaluation passes.
  config.num_eval_examples = 0  # Evaluate on the first N test images (0: all).
  config.num_train_eval_examples = 2000  # Train-split alignment on the first N train images.
  # Log per-layer alignment in evaluations of objectives that do not tap layers (standard,
  # pgd_at, ...; one extra backward pass per eval batch). GFA runs always log it.
  config.eval_alignment = False
  config.checkpoint_every_steps = 500  # Orbax checkpoint period (also saved at the end).
  config.max_to_keep = 2  # Checkpoints kept on disk.
  return config
