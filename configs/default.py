"""Every field the trainer reads, with the paper's CIFAR-10 recipe as defaults.

Other configs start from `get_config()` here and change what differs. Fields
left at None take their value from the model registry or the data set.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  # "at" (PGD-AT, Madry et al.), "trades", "mart", or "natural" (no attack,
  # the baseline arm).
  config.method = "at"
  config.beta = 6.0  # TRADES / MART trade-off
  # The paper's two tricks, acting only on the training attack: ARD drops
  # attention-branch gradients, PRM masks the perturbation on image cells.
  # Both keep a fraction r(t) = min(t / warmup_epochs, 1) * final_keep_rate
  # at the fractional epoch t (ARD: each block's gradient kept with
  # probability r; PRM: a fraction r of the cells kept), so they fade out
  # over the warm-up.
  config.tricks = ml_collections.ConfigDict()
  config.tricks.ard = False
  config.tricks.prm = False
  config.tricks.warmup_epochs = 10.0  # n_w (not optim.warmup_epochs, the lr's)
  config.tricks.final_keep_rate = 1.0  # r after the warm-up (1 = tricks off)
  # PRM's cell size in pixels (the reference's --patch): the grid has
  # image_size / prm_patch_size cells per side whatever the model's own patch
  # size; 4 on CIFAR-10, 16 on Imagenette and ImageNet (Swin included).
  config.tricks.prm_patch_size = 4

  # Activations and matmuls in this dtype ("bfloat16" on GPU/TPU); params and
  # optimiser state stay float32. See docs/parallel.md.
  config.compute_dtype = "float32"
  # Precision of float32 matmuls (the patch embedding's is always "highest"):
  # "default" (the backend's: TF32 on recent GPUs, one bfloat16 pass on
  # TPU), "high", "highest", or "auto": "default" on CPU/GPU, "high" on TPU
  # for training, "highest" for float32 evaluation. See docs/precision.md.
  config.matmul_precision = "auto"

  config.model = ml_collections.ConfigDict()
  config.model.name = "deit_tiny_patch16_224"
  config.model.img_size = config_dict.placeholder(int)  # default: data's
  config.model.patch_size = config_dict.placeholder(int)
  config.model.embed_dim = config_dict.placeholder(int)
  config.model.depth = config_dict.placeholder(int)
  config.model.num_heads = config_dict.placeholder(int)
  # Swin's attention window (None = the timm name's, 7).
  config.model.window_size = config_dict.placeholder(int)
  config.model.mlp_ratio = config_dict.placeholder(float)
  config.model.drop_path_rate = config_dict.placeholder(float)
  # Recompute each block's activations in the backward pass instead of
  # keeping them: less memory, about a third more compute (ViT/DeiT, Swin).
  config.model.remat = config_dict.placeholder(bool)
  # Attention through jax.nn.dot_product_attention (cuDNN's fused kernel for
  # bfloat16 on GPU); False = the explicit einsum-softmax-einsum. None = the
  # model's default: fused on GPU/TPU, explicit on the CPU (4-6% faster
  # there, docs/performance.md); ViT/DeiT/ConViT only (Swin keeps its windows).
  config.model.fused_attention = config_dict.placeholder(bool)
  # "trunc_normal": the reference's (timm's) initialisation, std 0.02 for
  # linear layers (a replaced head included) and the tokens; "xavier_uniform":
  # this project's choice for small models trained from scratch.
  config.model.weight_init = "trunc_normal"

  # Initialisation: "" trains from scratch; otherwise a timm/PyTorch
  # (.safetensors, .pth) or Google ViT (.npz) checkpoint, resampled to the
  # model's image/patch/window sizes, with a new head for the data's classes.
  config.init = ml_collections.ConfigDict()
  config.init.checkpoint = ""
  config.init.format = "auto"  # auto | safetensors | torch | npz
  config.init.allow_pickle = False  # .pth holding arbitrary objects
  # Where the checkpoint comes from (a timm tag or a URL), named in the error
  # when the file is missing; set by the paper configs.
  config.init.source = ""
  # --mode=eval of init.checkpoint (an external timm file): False evaluates
  # the network as timm defines it (its image, patch and window sizes and
  # normalisation; data of another size is refused unless
  # eval.resize_to_model); True resamples it to the data's sizes, as
  # training does (a WARNING line). Training always resamples.
  config.init.resample = False

  config.data = ml_collections.ConfigDict()
  config.data.name = "tfds"  # digits | image_folder | tfds
  config.data.root = ""  # image_folder: root/{train,test}/<class>/
  config.data.tfds_name = "cifar10"
  config.data.tfds_data_dir = ""
  config.data.train_split = "train"
  config.data.test_split = "test"
  config.data.image_size = 32
  # N > 0: a seeded, class-stratified subset of N (as many of each class
  # as N allows, the remainder to classes drawn with subset_seed; the same
  # on every run, host and device count). 0 = all.
  config.data.train_examples = 0
  config.data.test_examples = 0
  config.data.subset_seed = 0  # also picks eval.*num_examples' subsets
  config.data.cache_dir = ""
  config.data.mean = ()  # () = data.stats' (below)
  config.data.std = ()
  # The statistics for an empty data.mean / data.std, by name: cifar10 |
  # cifar100 | imagenet | digits; "" = the source's own: the digits', a tfds
  # data set's by its tfds name (cifar10, cifar100, else ImageNet's), an
  # image folder's ImageNet's (never guessed from the folder's path).
  config.data.stats = ""
  # Host-side transforms (vitat_jax/data/decode.py). Train: "squash" (resize
  # to image_size; the reference's recipe, pad-crop and flip then run on the
  # device) or "random_resized_crop" (+ augment.flip; set crop_padding=0).
  # Eval: "squash" or "resize_center_crop" (Resize(image_size / crop_pct),
  # CenterCrop(image_size): RobustBench's Res256Crop224).
  config.data.train_transform = "squash"
  config.data.eval_transform = "squash"
  config.data.rrc_scale = (0.08, 1.0)
  config.data.rrc_ratio = (3 / 4, 4 / 3)
  config.data.crop_pct = 0.875
  # "" = the whole test split; "robustbench" = RobustBench's 5000 ImageNet
  # validation images (image_folder with ImageNet's val/ as root/test/).
  config.data.eval_subset = ""
  # Loader worker processes (grain): None = one per CPU beyond the first
  # for sources that decode, 0 for in-memory ones; 0 = in this process.
  config.data.workers = config_dict.placeholder(int)
  # Image folders whose decoded split (squash) fits in this many MB are
  # decoded once and kept in memory (and cached on disk); 0 = always lazy.
  config.data.decoded_cache_mb = 1024
  # Extra training data mixed into every batch (e.g. generated images, as in
  # DM-Improves-AT): "" = off; an .npz with "image" (uint8 [N, H, W, 3]) and
  # "label" (int [N]), or an image folder <extra>/<class>/*.png named like
  # the main set's classes. Each global batch takes extra_fraction x
  # batch_size (rounded half up; a multiple of the device count) rows from
  # it, the rest from the main set (docs/data.md, "Extra data").
  config.data.extra = ""
  config.data.extra_fraction = 0.0  # in (0, 1) with extra; 0 without

  config.augment = ml_collections.ConfigDict()
  config.augment.crop_padding = 4
  config.augment.flip = True
  # "" = off; e.g. "rand-m9-n2" or "rand-m9-mstd0.5" (timm's RandAugment and
  # its spec grammar, which the paper found to hurt adversarial training).
  config.augment.randaugment = ""

  # Mixup / CutMix per batch (timm's Mixup, mode "batch"), active in the
  # reference's AT runs; prob = 0 turns both off.
  config.mixup = ml_collections.ConfigDict()
  config.mixup.prob = 0.3
  config.mixup.switch_prob = 0.5
  config.mixup.mixup_alpha = 0.8
  config.mixup.cutmix_alpha = 1.0
  config.mixup.label_smoothing = 0.0

  # The training attack: PGD-10, eps 8/255, step 2/255.
  config.attack = ml_collections.ConfigDict()
  config.attack.eps = 8 / 255
  config.attack.alpha = 2 / 255
  config.attack.steps = 10
  # The training attack's iteration: "pgd" (the paper's: sign steps of
  # alpha from a random start) or "apgd" (APGD-CE's, as the evaluation's:
  # steps iterations from 2 * eps, halved at its checkpoints, momentum 0.75;
  # alpha unused), on each method's own inner loss (CE for AT and MART, the
  # KL for TRADES), with ARD, PRM and the epsilon warm-up acting on either.
  config.attack.name = "pgd"
  # Epsilon warm-up (0 = off): the training attack's eps and step grow
  # linearly, per step, from eps_warmup_floor * eps to eps over these epochs
  # (the Light recipe), logged as train_eps and drawn in schedules.png.
  config.attack.eps_warmup_epochs = 0.0
  config.attack.eps_warmup_floor = 0.0

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "sgd"  # sgd | adamw
  config.optim.lr = 0.1
  # SGD momentum; None = the model family's (model_names.sgd_momentum): 0.5 for
  # Swin, as the reference's Swin runs, 0.9 for the others.
  config.optim.momentum = config_dict.placeholder(float)
  config.optim.weight_decay = 1e-4
  config.optim.grad_clip = 1.0  # global norm; 0 turns clipping off
  config.optim.schedule = "piecewise"  # piecewise | cyclic | cosine | constant
  # piecewise: the lr is divided by 10 at each milestone. "end": epochs
  # counted back from the end of the run, the reference code's (5, 2) = E-5
  # and E-2 (35 and 38 of 40; a run of 5 epochs or less never trains at
  # optim.lr, and the log warns); "start": absolute epochs, e.g. (36, 38),
  # the paper's text. See docs/reference_differences.md.
  config.optim.milestones = (5.0, 2.0)
  config.optim.milestones_from = "end"  # end | start
  config.optim.warmup_epochs = 0.0  # cosine only
  config.optim.nesterov = False  # sgd
  config.optim.b1 = 0.9  # adamw
  config.optim.b2 = 0.999  # adamw
  # Parameter groups (docs/recipes.md). no_decay: "auto" = no weight decay
  # on 1-D params (biases, norms), tokens and position tables (timm's rule);
  # "none" = decay every param; "" = the optimizer's default (adamw: auto,
  # sgd: none, the reference's). no_decay_extra: regexes of further param
  # names without decay (e.g. ("head",)), for either optimizer.
  config.optim.no_decay = ""  # "" | auto | none
  config.optim.no_decay_extra = ()
  # Layer-wise lr decay (ViT/DeiT/ConViT/Swin): a param at layer l of L gets
  # lr * layer_decay ** (L - l); 0 or 1 = off.
  config.optim.layer_decay = 0.0

  # An exponential moving average of the params (Polyak averaging), as the
  # strongest robust ViT recipes train (ARES: 0.9998; DeepMind: 0.995).
  # decay 0 = off. With warmup, the decay at update t is
  # min(decay, (1 + t) / (10 + t)), so early averages do not hold on to the
  # random init. Saved in the checkpoint with the params; the evaluations,
  # --mode=eval and export use eval.weights' choice.
  config.ema = ml_collections.ConfigDict()
  config.ema.decay = 0.0
  config.ema.warmup = False

  config.epochs = 40.0
  config.batch_size = 64
  # Micro-batches per step (the reference's --accum-steps): gradients of the
  # batch_size / accum_steps slices are averaged, then one optimiser step.
  config.accum_steps = 1
  # FSDP-style state sharding: params and optimiser state with at least
  # fsdp_min_size elements are split over the devices along their largest
  # dimension the device count divides (XLA gathers them per use); False
  # keeps a full copy on every device. See docs/parallel.md.
  config.fsdp = False
  config.fsdp_min_size = 2**16
  # Devices in the data mesh: 0 = every device of every host; k = the first
  # k / process_count devices of each host.
  config.num_devices = 0
  # What one device may hold, in GiB; 0 = what the backend reports (GPU,
  # TPU; the CPU reports nothing: no check). The training step is compiled
  # before its first run and refused in one line, naming the accum_steps
  # that would fit, if it needs more (vitat_jax/memory.py).
  config.device_memory_gb = 0.0

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 128
  # The evaluations' compute dtype: "" = the run's compute_dtype; e.g.
  # "float32" evaluates a bfloat16-trained run at full precision (the params
  # are float32 either way; --mode=eval can set it).
  config.eval.compute_dtype = ""
  # Which weights the evaluations use: "auto" = the EMA params when the run
  # keeps them (ema.decay > 0), else the raw params; "ema" or "raw".
  config.eval.weights = "auto"
  config.eval.eps = config_dict.placeholder(float)  # default: attack.eps
  config.eval.alpha = 2 / 255
  config.eval.restarts = 1
  # Final evaluation on N test images, a stratified subset like
  # data.test_examples' (RobustBench's protocol: its first N); 0 = all.
  # The log and robustness.json (`eval_subset`) say which.
  config.eval.num_examples = 0
  # The reference's final evaluation: CW-20, PGD-20, PGD-100, AutoAttack.
  config.eval.attacks = ("clean", "cw20", "pgd20", "pgd100", "aa")
  # After each epoch, on a stratified subset of N; 0 = no epoch eval.
  config.eval.epoch_num_examples = 500
  config.eval.epoch_attacks = ("clean", "pgd20")
  # AutoAttack ("aa" in eval.attacks): fra31's versions, or a custom list
  # of attacks (then the version is left at "standard"); norm Linf or L2
  # (L2: APGD attacks only). batch_size 0 = eval.batch_size.
  config.eval.autoattack = ml_collections.ConfigDict()
  config.eval.autoattack.version = "standard"  # standard | plus | rand
  config.eval.autoattack.attacks = ()  # e.g. ("apgd-ce", "square")
  config.eval.autoattack.norm = "Linf"
  config.eval.autoattack.batch_size = 0
  # "" = eval.num_examples test images; "robustbench": RobustBench's set
  # (CIFAR-10: the first 10,000 test images at 32 px; ImageNet, an image
  # folder: its 5,000 validation files, read with
  # eval.robustbench_preprocessing, Res256Crop224 or Res224, whatever the
  # run trained with).
  config.eval.protocol = ""
  config.eval.robustbench_preprocessing = "Res256Crop224"
  # The final evaluation's adversarial examples, per attack (PGD, CW and
  # AutoAttack's members), in workdir/adversarial/<attack>.npz: the points
  # each attack broke (indices into the test split, images, labels).
  config.eval.save_adversarial = False
  # --mode=eval of init.checkpoint: resize the test images to the model's
  # native size with data.eval_transform (a 32-px CIFAR-10 folder upsampled
  # to 224, as RobustBench does), instead of refusing data of another size.
  config.eval.resize_to_model = False

  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  # Also a checkpoint at the first log step after this many minutes since
  # the last one (process 0's clock, for all hosts): a killed run loses at
  # most about this much work; 0 = by steps only.
  config.checkpoint_every_minutes = 5.0
  # And one at the end of every this many epochs (0 = none).
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 3
  # Compiled executables are kept here, so a restart loads them ("" = off;
  # JAX_COMPILATION_CACHE_DIR, when set, wins).
  config.compilation_cache_dir = "~/.cache/vitat_jax/xla"
  return config
