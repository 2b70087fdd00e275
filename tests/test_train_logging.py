"""Training logs: TensorBoard event files (tensorboardX) read back by TensorFlow, metrics.jsonl,
the console line."""

import io
import json

import pytest

from clip_jax import metrics_writer


def test_tensorboard_events_are_read_back_by_tensorflow(tmp_path):
  import tensorflow as tf
  writer = metrics_writer.MetricsWriter(str(tmp_path), dict(tensorboard=True, progress_bar=False),
                                        total_steps=10)
  writer.write(10, {'loss': 2.5, 'learning_rate': 1e-3})
  writer.write(2**40, {'eval/zeroshot/builtin_test/top1': 41.25})
  writer.close()
  (events_file,) = (tmp_path / 'tensorboard').glob('events.out.tfevents.*')
  events = [tf.compat.v1.Event.FromString(r.numpy())   # TFRecordDataset checks every CRC
            for r in tf.data.TFRecordDataset(str(events_file))]
  assert events[0].file_version == 'brain.Event:2'
  scalars = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
  assert [(step, tag) for step, tag, _ in scalars] == [
      (10, 'loss'), (10, 'learning_rate'), (2**40, 'eval/zeroshot/builtin_test/top1')]
  assert [value for *_, value in scalars] == pytest.approx([2.5, 1e-3, 41.25])


def test_metrics_writer_jsonl_and_inactive_processes(tmp_path, capsys):
  log = dict(tensorboard=True, progress_bar=True)
  writer = metrics_writer.MetricsWriter(str(tmp_path), log, total_steps=100)
  writer.write(5, {'loss': 1.0}, console='step 5')
  writer.write(10, {'loss': 0.5})
  writer.close()
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['loss']) for r in lines] == [(5, 1.0), (10, 0.5)]
  assert capsys.readouterr().out == 'step 5\n'   # not a TTY: no progress bar drawn
  quiet = metrics_writer.MetricsWriter(str(tmp_path / 'other'), log, total_steps=100,
                                       active=False)
  quiet.write(5, {'loss': 1.0}, console='step 5')
  assert not (tmp_path / 'other').exists() and capsys.readouterr().out == ''


def test_console_line_and_durations():
  line = metrics_writer.console_line(
      100, 300, {'loss': 2.3456, 'learning_rate': 1.2e-3, 'temperature': 21.4,
                 'images_per_second': 930.4, 'mfu': 0.41}, elapsed=62, steps_per_second=2.0)
  assert line == ('step 100/300 | loss 2.3456 | lr 1.20e-03 | temp 21.40 | 930 img/s | '
                  'MFU 41.0% | elapsed 1m02s, ETA 1m40s')
  assert metrics_writer.format_duration(3725) == '1h02m05s'
  assert 'ETA ?' in metrics_writer.console_line(1, 10, {}, 0.0, 0.0)


def test_progress_bar_draws_only_on_a_tty():
  class Tty(io.StringIO):
    def isatty(self):
      return True
  stream = Tty()
  bar = metrics_writer.ProgressBar(10, stream, width=10, min_interval=0)
  bar.update(5)
  assert stream.getvalue() == '\r[#####.....] 5/10'
  bar.clear()
  assert stream.getvalue().endswith('\r')
  plain = io.StringIO()
  metrics_writer.ProgressBar(10, plain, min_interval=0).update(5)
  assert plain.getvalue() == ''
