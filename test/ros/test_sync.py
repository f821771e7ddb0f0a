"""ApproximateSync with hand-made stamps: matching, slop, RGB-only mode, interleavings,
out-of-order stamps, queue overflow, superseded frames, thread safety."""
from __future__ import annotations

import itertools
import threading

import pytest

from affordance_ros.sync import ApproximateSync, Frame

MS = 1_000_000
SLOP = 10 * MS


def sync(require_depth=True, queue=5, slop=SLOP, **kw):
    return ApproximateSync(slop, queue, require_depth, **kw)


def feed(s, *events):
    """events: (kind, stamp_ms) -> list of frames returned by add (None dropped)."""
    out = []
    for kind, ms in events:
        f = s.add(kind, f'{kind}@{ms}', int(ms * MS))
        if f is not None:
            out.append(f)
    return out


def test_exact_match_returns_frame_and_fills_slot():
    s = sync()
    assert feed(s, ('image', 100), ('depth', 100)) == []
    f = s.add_camera_info('camera_info@100', 100 * MS)
    assert f == Frame('image@100', 'depth@100', 'camera_info@100', 100 * MS)
    assert s.peek() is f
    assert s.take() is f and s.take() is None
    assert s.queued() == {'image': [], 'depth': [], 'camera_info': []}
    assert s.last_matched_ns == 100 * MS and s.matched == 1
    assert sum(s.counts().values()) == 0


def test_every_arrival_order_of_one_frame_matches_once():
    for order in itertools.permutations(['image', 'depth', 'camera_info']):
        s = sync()
        frames = feed(s, *[(k, 100) for k in order])
        assert len(frames) == 1 and frames[0].stamp_ns == 100 * MS, order


def test_within_slop_picks_nearest_partners():
    s = sync()
    feed(s, ('depth', 95), ('depth', 103), ('camera_info', 91), ('camera_info', 99))
    (f,) = feed(s, ('image', 101))
    assert f.depth == 'depth@103' and f.camera_info == 'camera_info@99'
    assert f.stamp_ns == 101 * MS  # the image stamp


def test_slop_boundary_inclusive_and_outside():
    s = sync()
    assert len(feed(s, ('image', 100), ('depth', 110), ('camera_info', 90))) == 1
    s = sync()
    assert feed(s, ('image', 100), ('depth', 111), ('camera_info', 100)) == []
    assert s.peek() is None


def test_missing_depth_never_matches_when_required():
    s = sync(require_depth=True)
    assert feed(s, ('image', 100), ('camera_info', 100), ('image', 200),
                ('camera_info', 200)) == []
    assert s.take() is None


def test_required_depth_needs_camera_info_too():
    s = sync(require_depth=True)
    assert feed(s, ('image', 100), ('depth', 100)) == []
    assert len(feed(s, ('camera_info', 100))) == 1


def test_rgb_only_without_any_partner_matches_each_image_at_once():
    s = sync(require_depth=False)
    frames = feed(s, ('image', 100), ('image', 200))
    assert [(f.stamp_ns, f.depth, f.camera_info) for f in frames] == \
        [(100 * MS, None, None), (200 * MS, None, None)]
    assert s.counts()['superseded'] == 1  # the first was never taken


def test_rgb_only_waits_for_camera_info_once_seen():
    s = sync(require_depth=False)
    feed(s, ('camera_info', 100))
    assert feed(s, ('image', 200)) == []  # camera_info alive: wait for its partner
    (f,) = feed(s, ('camera_info', 200))
    assert f.camera_info == 'camera_info@200' and f.depth is None


def test_rgb_only_uses_depth_while_it_streams_and_falls_back_when_it_stops():
    s = sync(require_depth=False, optional_timeout_ns=1000 * MS)
    feed(s, ('depth', 100), ('camera_info', 100))
    (f,) = feed(s, ('image', 100))
    assert f.depth == 'depth@100'
    # depth streaming: an image waits for its depth
    assert feed(s, ('camera_info', 200), ('image', 200)) == []
    (f,) = feed(s, ('depth', 200))
    assert f.stamp_ns == 200 * MS and f.depth == 'depth@200'
    # depth stopped (last one 200 ms; timeout 1 s): after that, images go out without it
    (f,) = feed(s, ('camera_info', 1300), ('image', 1300))
    assert f.depth is None and f.camera_info == 'camera_info@1300'


def test_rgb_only_depth_without_camera_info_waits_for_camera_info():
    s = sync(require_depth=False)
    assert feed(s, ('depth', 100), ('image', 100)) == []  # depth alive -> K needed
    assert len(feed(s, ('camera_info', 100))) == 1


def test_interleavings_of_two_frames():
    # two frames 100 ms apart, all 720 arrival orders: frames come out in stamp order, the
    # last is frame 200, partners always belong to their frame, nothing is lost silently
    events = [('image', 100), ('depth', 100), ('camera_info', 100), ('image', 200),
              ('depth', 200), ('camera_info', 200)]
    for order in itertools.permutations(range(6)):
        s = sync()
        frames = feed(s, *[events[i] for i in order])
        stamps = [f.stamp_ns for f in frames]
        assert stamps == sorted(stamps) and stamps[-1] == 200 * MS, order
        assert s.take().stamp_ns == 200 * MS
        for f in frames:
            ms = f.stamp_ns // MS
            assert (f.image, f.depth, f.camera_info) == \
                (f'image@{ms}', f'depth@{ms}', f'camera_info@{ms}'), order
        counts = s.counts()
        if len(frames) == 1:  # frame 100 could not complete before 200 did
            assert counts['out_of_order'] + counts['no_depth'] + \
                counts['no_camera_info'] >= 1, order
        else:
            assert counts['superseded'] == 1, order


def test_depth_arriving_late_for_newer_image_matches_older_one():
    s = sync()
    feed(s, ('camera_info', 100), ('camera_info', 200), ('image', 100), ('image', 200))
    (f,) = feed(s, ('depth', 100))
    assert f.stamp_ns == 100 * MS
    assert s.queued()['image'] == [200 * MS]
    (f,) = feed(s, ('depth', 200))
    assert f.stamp_ns == 200 * MS and s.counts()['superseded'] == 1


def test_newer_match_discards_older_unmatched_images_with_reason():
    s = sync()
    feed(s, ('image', 100), ('camera_info', 100), ('image', 200), ('depth', 200))
    (f,) = feed(s, ('camera_info', 200))
    assert f.stamp_ns == 200 * MS
    assert s.counts()['no_depth'] == 1 and s.queued()['image'] == []
    s = sync()
    feed(s, ('image', 100), ('depth', 100), ('image', 200), ('depth', 200))
    feed(s, ('camera_info', 200))
    assert s.counts()['no_camera_info'] == 1


def test_out_of_order_stamps_are_dropped_and_counted():
    s = sync()
    feed(s, ('image', 200), ('depth', 200), ('camera_info', 200))
    dropped = []
    s.on_drop = lambda reason, n: dropped.append((reason, n))
    for kind in ('image', 'depth', 'camera_info'):
        assert s.add(kind, 'old', 150 * MS) is None
    assert s.add('image', 'dup', 200 * MS) is None  # equal to the last matched stamp
    assert s.counts()['out_of_order'] == 4
    assert dropped == [('out_of_order', 1)] * 4
    assert s.queued() == {'image': [], 'depth': [], 'camera_info': []}
    assert len(feed(s, ('image', 300), ('depth', 300), ('camera_info', 300))) == 1


def test_queue_overflow_keeps_newest_and_counts_evicted_images():
    s = sync(queue=3)
    feed(s, *[('image', t) for t in (100, 200, 300, 400, 500)])
    assert s.queued()['image'] == [300 * MS, 400 * MS, 500 * MS]
    assert s.counts()['no_depth'] == 2
    feed(s, *[('depth', t) for t in (10, 20, 30, 40)])  # unmatched depths: not frame drops
    assert s.queued()['depth'] == [20 * MS, 30 * MS, 40 * MS]
    (f,) = feed(s, ('depth', 500), ('camera_info', 500))
    assert f.stamp_ns == 500 * MS
    assert s.counts()['no_depth'] == 4  # 300 and 400 discarded by the newer match


def test_equal_stamp_replaces_queued_message():
    s = sync()
    feed(s, ('image', 100), ('image', 100))
    assert s.queued()['image'] == [100 * MS]
    s.add_image('second', 100 * MS)
    (f,) = feed(s, ('depth', 100), ('camera_info', 100))
    assert f.image == 'second'


def test_superseded_counts_untaken_frames_only():
    s = sync(require_depth=False)
    feed(s, ('image', 1))
    s.take()
    feed(s, ('image', 2), ('image', 3), ('image', 4))
    assert s.counts()['superseded'] == 2
    assert s.take().stamp_ns == 4 * MS


def test_bad_arguments_and_reset():
    with pytest.raises(ValueError, match='queue_size'):
        ApproximateSync(SLOP, 0, True)
    with pytest.raises(ValueError, match='slop_ns'):
        ApproximateSync(-1, 3, True)
    s = sync()
    with pytest.raises(ValueError, match='stamp_ns must be > 0'):
        s.add_image('x', 0)
    with pytest.raises(ValueError, match='unknown input kind'):
        s.add('imu', 'x', 5)
    feed(s, ('image', 100), ('depth', 100), ('camera_info', 100), ('image', 50))
    s.reset()
    assert s.last_matched_ns == 0 and s.take() is None and sum(s.counts().values()) == 0
    assert len(feed(s, ('image', 50), ('depth', 50), ('camera_info', 50))) == 1


def test_thread_safety_under_concurrent_producers_and_consumer():
    s = sync(queue=4, slop=2 * MS)
    n = 300
    taken = []
    stop = threading.Event()

    def producer(kind):
        for i in range(1, n + 1):
            s.add(kind, f'{kind}@{i}', i * 100 * MS)

    def consumer():
        while not stop.is_set():
            f = s.take()
            if f is not None:
                taken.append(f)
        f = s.take()
        if f is not None:
            taken.append(f)

    threads = [threading.Thread(target=producer, args=(k,)) for k in
               ('image', 'depth', 'camera_info')]
    c = threading.Thread(target=consumer)
    c.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    c.join()
    stamps = [f.stamp_ns for f in taken]
    assert stamps == sorted(set(stamps)) and stamps[-1] == n * 100 * MS
    for f in taken:
        i = f.stamp_ns // (100 * MS)
        assert (f.image, f.depth, f.camera_info) == (f'image@{i}', f'depth@{i}',
                                                     f'camera_info@{i}')
    counts = s.counts()
    # every frame is taken, superseded, or lost to an ordering drop -- never duplicated
    assert s.matched == len(taken) + counts['superseded']


def test_expected_inputs_are_waited_for_from_the_first_image():
    # RGB-only mode, first image before the first depth / camera_info: without expect the
    # image goes out alone and its partners arrive out of order
    s = sync(require_depth=False)
    (f,) = feed(s, ('image', 100))
    assert f.depth is None
    feed(s, ('depth', 100), ('camera_info', 100))
    assert s.counts()['out_of_order'] == 2
    # with expect they are waited for
    s = sync(require_depth=False, optional_timeout_ns=1000 * MS)
    s.expect('depth', 'camera_info')
    assert feed(s, ('image', 100), ('depth', 100)) == []
    (f,) = feed(s, ('camera_info', 100))
    assert (f.depth, f.camera_info) == ('depth@100', 'camera_info@100')
    # an expected input that never comes stops being waited for after the timeout
    s = sync(require_depth=False, optional_timeout_ns=300 * MS)
    s.expect('depth')
    assert feed(s, ('image', 100), ('image', 300)) == []
    (f,) = feed(s, ('image', 500))
    assert f.stamp_ns == 500 * MS and f.depth is None
    assert s.counts()['no_depth'] == 2
    with pytest.raises(ValueError, match='unknown input kind'):
        s.expect('imu')
