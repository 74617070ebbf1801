"""A seconds-long run for tests: MLP on 256 embedded images, a handful of steps."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "mlp"
  config.model.hidden = (32, 16, 16)
  config.data_source = "embedded"
  config.num_train = 256
  config.batch_size = 32
  config.num_epochs = 2
  config.log_every_steps = 4
  config.eval_every_steps = 8
  config.eval_batch_size = 100
  config.num_eval_examples = 100
  config.num_train_eval_examples = 100
  config.checkpoint_every_steps = 4
  config.max_to_keep = 3
  return config
