"""RSICRC on LEVIR-CC with the reference defaults (SPEC brackets).

Usage: python launch.py --config configs/levir.py --workdir DIR [--config.batch_size=64 ...]
"""

import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  # Backbone: CLIP ModifiedResNet RN50 (RemoteCLIP weights), 224 px input -> 7x7x2048.
  m.backbone_layers = (3, 4, 6, 3)
  m.backbone_width = 64
  m.image_size = 224
  m.pos_table_size = 7  # rows of the encoder position tables (the RN50 feature-map size)
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
  # Fields of the TFDS builder config (rsicrc_jax/data/builders.py); 'default' = as built by a
  # plain `tfds build`. A variant (e.g. with caption embeddings) needs its own name.
  d.builder_config = ml_collections.ConfigDict({'name': 'default'})
  d.data_dir = ''  # '' = the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  d.vocab_path = ''  # a {word: id} JSON (e.g. a released checkpoint's); '' = the dataset's own
  d.num_threads = 4  # grain read threads
  d.prefetch = 8  # batches prefetched
  return d


def get_config() -> ml_collections.ConfigDict:
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
  config.eval_batch_size = 0  # 0 = batch_size
  config.log_every_steps = 10
  config.final_eval = True  # after training: `rsicrc_jax.eval` of best/ on the test split

  config.init = ml_collections.ConfigDict()
  # RemoteCLIP RN50 image tower: RemoteCLIP-RN50.pt, or the .npz from `convert remoteclip`.
  config.init.backbone = ''
  config.init.checkpoint = ''  # a whole-model dir (convert rsicrc / a run's best/) to start from

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.keep = 2  # periodic checkpoints kept (best/ is kept apart)
  config.checkpoint.every_steps = 0  # also save inside epochs every N steps; 0 = per epoch only

  config.sharding = ml_collections.ConfigDict()
  config.sharding.num_devices = 0  # devices on the 'data' mesh axis; 0 = all
  config.sharding.fsdp = False  # shard params and optimizer state over 'data' (ZeRO-3 style)
  return config
