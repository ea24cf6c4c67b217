"""RSICRC on LEVIR-CC with the reference defaults (SPEC brackets).

Usage: python launch.py --config configs/levir.py --workdir DIR [--config.batch_size=64 ...]

Variants of the paper's ablations, comma-separated after a colon (combinable):
  configs/levir.py:backbone=ViT-B-32   the image tower, its reference sizes and preprocessing
                                       (RN50, ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14, resnet50,
                                       resnet101)
  configs/levir.py:fna_off             false negatives removed but not attracted (FNE only)
  configs/levir.py:no_fne              neither removed nor attracted
  configs/levir.py:caption_only        captioning loss only (lambda 0)
  configs/levir.py:topk=K              the K hardest negatives over the batch
  configs/levir.py:hd=N                N mined hard negatives per item (the reference's --hd N)
"""

import ml_collections

from rsicrc_jax.models import backbone as backbones


def get_model_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  # Image tower (SPEC section 10): 'RN50' (CLIP ModifiedResNet) or an OpenCLIP ViT name
  # ('ViT-B-32', 'ViT-L-14', ...). Its size comes from the fields of its family below;
  # configs/levir.py:backbone=NAME sets the reference's sizes for NAME.
  m.backbone = 'RN50'
  # ModifiedResNet: RN50 (RemoteCLIP weights), 224 px input -> 7x7x2048.
  m.backbone_layers = (3, 4, 6, 3)
  m.backbone_width = 64
  # VisionTransformer (used when backbone is a ViT name): ViT-B-32 -> 7x7x768 at 224 px.
  m.vit_width = 768
  m.vit_layers = 12
  m.vit_heads = 12
  m.vit_patch_size = 32
  m.vit_quick_gelu = False  # exact GELU, as the reference's open_clip towers
  m.image_size = 224
  m.pos_table_size = 7  # rows of the encoder position tables (the feature-map side)
  # Input normalisation: 'clip' (RemoteCLIP towers) or 'imagenet' (torchvision ResNets).
  m.normalization = 'clip'
  # Bi-temporal encoder.
  m.d_model = 2048
  m.encoder_layers = 3
  m.num_heads = 8
  m.a_dim = 2048  # attention width
  m.h_dim = 512  # FFN hidden width
  m.value_from_key = True  # reference quirk: values use the key projection (needed for its weights)
  # Decoder.
  m.vocab_size = 468  # 464 words + PAD, START, UNK, END
  m.max_len = 41
  m.decoder_layers = 1  # unimodal layers; as many multimodal layers
  m.learnable = False  # sinusoidal positions
  m.tie_embeddings = True
  m.prenorm = False
  m.dropout = 0.1
  m.fine_tune = True  # train layer2..layer4 of the backbone; stem and layer1 frozen
  m.dtype = ''  # compute dtype, '' = float32; 'bfloat16' for mixed precision
  # Recompute blocks in the backward pass instead of storing their activations, so that larger
  # batches fit: '' (off), 'backbone', 'encoder' or 'all'. Same results, more FLOPs.
  m.remat = ''
  return m


def get_loss_config() -> ml_collections.ConfigDict:
  l = ml_collections.ConfigDict()
  l.lamb = 0.5  # total = caption + lamb * contrastive
  l.temperature = 0.01
  l.fne = True  # false negatives removed from the negatives
  l.fna = True  # ... and attracted as positives
  l.s_threshold = 1.0  # sentence-embedding cosine at/above which two captions are "the same"
  l.s_tolerance = 1e-6  # float slack on that comparison
  l.top_k = -1  # hardest negatives kept over the batch; -1 = all
  return l


def get_data_config() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.name = 'levir_cc'  # built with: tfds build datasets/levir_cc --manual_dir DIR
  # or several built datasets with weights, 'levir_cc:3,whu_cdc:1' (see README, Data)
  # Fields of the TFDS builder config (rsicrc_jax/data/builders.py); 'default' = as built by a
  # plain `tfds build`. A variant (e.g. with caption embeddings) needs its own name.
  # stored_size / raw: a variant built with the pictures already at the model's size, as uint8
  # arrays (e.g. name '224raw', stored_size=224, raw=True: ~8x the host throughput; see README).
  d.builder_config = ml_collections.ConfigDict({'name': 'default', 'stored_size': 0, 'raw': False})
  d.data_dir = ''  # '' = the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  d.vocab_path = ''  # a {word: id} JSON (e.g. a released checkpoint's); '' = the dataset's own
  d.num_threads = 4  # grain read threads
  d.prefetch = 8  # batches prefetched
  # Records kept in memory once read, pictures decoded and resized (MB, per process; 0 = off),
  # so each picture is decoded once per run rather than once per caption per epoch. LEVIR-CC's
  # three splits take ~3.9 GB at 224 px; past the budget, records are read from disk each time.
  d.cache_mb = 4096
  # Train batches are padded to their longest caption (START and END included), rounded up to a
  # multiple of this, instead of to max_len as the reference: the decoder skips the PAD slots
  # (LEVIR-CC captions average 7.9 words of the 39 that fit). The losses and gradients are
  # those of the max_len batch, but for dropout, whose masks are drawn for the shorter shape.
  # Each length met compiles the step once. 0 = always max_len.
  d.caption_pad_multiple = 8
  return d


def eval_entry(type: str, split: str = 'val', **fields) -> ml_collections.ConfigDict:  # pylint: disable=redefined-builtin
  """A `config.evals` entry with every field of its type present, so any can be set on the
  command line (--config.evals.val_caption.beam_size=3). See rsicrc_jax/evaluators.py."""
  e = {'type': type, 'split': split, 'every_epochs': 1, 'every_steps': 0, 'prefix': ''}
  if type in ('retrieval', 'caption'):
    e['max_pairs'] = 0  # 0 = the whole split
  if type == 'caption':
    e.update(beam_size=1, length_penalty=0.0, meteor=False,  # METEOR starts Java: slow
             caption_protocol='reference')  # or 'chg2cap' (see config.eval)
  e.update(fields)
  return ml_collections.ConfigDict(e)


def get_eval_config() -> ml_collections.ConfigDict:
  """`python -m rsicrc_jax.eval` and the final eval after training (--config.eval.beam_size=3)."""
  e = ml_collections.ConfigDict()
  e.split = 'test'
  e.batch_size = 32
  e.beam_size = 1  # 1 = greedy, as the paper
  e.length_penalty = 0.0  # beam score / length ** this
  e.num_figures = 8  # pairs drawn to figures/
  e.max_pairs = 0  # score only the first N pairs; 0 = all
  e.meteor = True  # METEOR needs `java` on PATH; skipped with a note otherwise
  # 'reference': raw references, whose final " ." counts (the RSICRC code); 'chg2cap': lowercased
  # and punctuation stripped on both sides, as most published LEVIR-CC tables.
  e.caption_protocol = 'reference'
  return e


VARIANTS = ('backbone=NAME', 'fna_off', 'no_fne', 'caption_only', 'topk=K', 'hd=N')


def apply_variants(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Applies `backbone=NAME,fna_off,no_fne,caption_only,topk=K,hd=N` (see the module
  docstring)."""
  for item in filter(None, (s.strip() for s in (arg or '').split(','))):
    name, _, value = item.partition('=')
    if name == 'backbone' and value in backbones.PRESETS:
      config.model.backbone = value
      config.model.update(backbones.PRESETS[value])
    elif name == 'fna_off' and not value:
      config.loss.fna = False
    elif name == 'no_fne' and not value:
      config.loss.fne = config.loss.fna = False
    elif name == 'caption_only' and not value:
      config.loss.lamb = 0.0
    elif name == 'topk' and value.isdigit() and int(value) > 0:
      config.loss.top_k = int(value)
    elif name == 'hd' and value.isdigit():
      config.hard_negatives = int(value)
    else:
      raise ValueError(
          f'config variant {item!r}: expected backbone=NAME (NAME one of '
          f'{list(backbones.PRESETS)}), fna_off, no_fne, caption_only, topk=K (K > 0) or hd=N '
          '(N >= 0)')
  return config


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = get_model_config()
  config.loss = get_loss_config()
  config.data = get_data_config()
  config.seed = 42
  config.batch_size = 4
  config.epochs = 50
  config.learning_rate = 1e-4
  config.adam_eps = 1e-8
  config.weight_decay = 0.01
  config.warmup_fraction = 0.025
  config.lr_schedule = 'constant'  # after warmup; 'cosine' decays to 0 at the last step
  config.max_grad_norm = 0.0  # 0 = no clipping
  config.grad_accum_steps = 1  # >1: the batch is split into this many microbatches per update
  # Hard-negative mining (SPEC section 11, the reference's --hd): at the start and after every
  # epoch, mine this many negatives per train item with the eval-mode model; a batch of B items
  # then trains on B * (1 + hard_negatives). 0 = off (the reference's default).
  config.hard_negatives = 0
  config.eval_batch_size = 0  # 0 = batch_size
  config.log_every_steps = 10
  config.final_eval = True  # after training: `rsicrc_jax.eval` of best/ on the test split
  config.eval = get_eval_config()

  # Evaluators run during training, each on its schedule; metrics are named <split>/... .
  config.evals = ml_collections.ConfigDict()
  config.evals.val = eval_entry('loss')  # val/loss, val/caption_loss, val/contrastive_loss
  config.evals.val_retrieval = eval_entry('retrieval')  # val/retrieval[/changed]/R@10, ...
  config.evals.val_caption = eval_entry('caption')  # val/caption[/changed]/BLEU-4, CIDEr-D, ...
  # The metric that chooses workdir/best, and its direction ('auto': min for names ending in
  # 'loss', else max). The reference keeps the lowest validation loss.
  config.best_metric = 'val/loss'
  config.best_metric_mode = 'auto'

  config.init = ml_collections.ConfigDict()
  # RemoteCLIP RN50 image tower: RemoteCLIP-RN50.pt, or the .npz from `convert remoteclip`.
  config.init.backbone = ''
  config.init.checkpoint = ''  # a whole-model dir (convert rsicrc / a run's best/) to start from

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.keep = 2  # periodic checkpoints kept (best/ is kept apart)
  config.checkpoint.every_steps = 0  # also save inside epochs every N steps; 0 = per epoch only
  # ... and whenever this many minutes have passed since the last save, so that a hard kill
  # loses minutes, not an epoch (25 minutes on one GPU at this recipe); 0 = off. SIGINT and
  # SIGTERM always save at the current step.
  config.checkpoint.every_minutes = 10.0

  config.sharding = ml_collections.ConfigDict()
  config.sharding.num_devices = 0  # devices on the 'data' mesh axis; 0 = all
  config.sharding.fsdp = False  # shard params and optimizer state over 'data' (ZeRO-3 style)
  return apply_variants(config, arg)
