import math

import numpy as np
import pytest
import torch

from mvdiff import cameras


def test_get_camera_equals_official(reference):
    tensors, meta = reference
    for name, args in meta["camera_args"].items():
        args = dict(args)
        n = args.pop("num_frames")
        ours = cameras.get_camera(n, **args)
        assert ours.dtype == torch.float32 and ours.shape == (n, 16)
        assert (ours - tensors[name]).abs().max() <= 1e-6, name


def test_azimuth_zero_is_front_view_on_minus_y():
    c2w = cameras.orbit_c2w(0.0, 0.0, 2.0)
    np.testing.assert_allclose(c2w[:3, 3], [0, -2, 0], atol=1e-12)
    # camera looks down its -z axis, towards the origin; +y (up) is world +z
    np.testing.assert_allclose(-c2w[:3, 2], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(c2w[:3, 1], [0, 0, 1], atol=1e-12)
    # counter-clockwise seen from +z: azimuth 90 puts the camera on +x
    np.testing.assert_allclose(cameras.orbit_positions(0.0, 90.0), [1, 0, 0], atol=1e-12)
    # elevation lifts the camera above the xy-plane
    assert cameras.orbit_positions(30.0, 0.0)[2] == pytest.approx(0.5)


def test_c2w_is_rigid_and_looks_at_origin():
    rng = np.random.default_rng(0)
    el, az, d = rng.uniform(-60, 60, 20), rng.uniform(0, 360, 20), rng.uniform(0.5, 3, 20)
    c2w = cameras.orbit_c2w(el, az, d)
    rot = c2w[:, :3, :3]
    np.testing.assert_allclose(
        rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-12)
    view_dir = -rot[:, :, 2]
    to_origin = -c2w[:, :3, 3] / d[:, None]
    np.testing.assert_allclose(view_dir, to_origin, atol=1e-12)


def test_gl_cv_round_trip_and_projection():
    c2w = cameras.orbit_c2w(20.0, 35.0, 2.5)
    cv = cameras.gl_to_cv(c2w)
    np.testing.assert_allclose(cameras.cv_to_gl(cv), c2w)
    torch.testing.assert_close(cameras.gl_to_cv(torch.from_numpy(c2w)), torch.from_numpy(cv))
    # In OpenCV the origin (the look-at target) is in front (+z) and projects to the centre.
    K = cameras.intrinsics_from_fov(40.0, 64)
    w2c = np.linalg.inv(cv)
    p = w2c @ np.array([0, 0, 0, 1.0])
    assert p[2] > 0
    uv = (K @ p[:3])[:2] / p[2]
    np.testing.assert_allclose(uv, [32, 32], atol=1e-9)
    # a point at the edge of the field of view lands on the image border
    edge = cv[:3, :3] @ np.array([math.tan(math.radians(20)) * p[2], 0, p[2]]) + cv[:3, 3]
    q = w2c @ np.append(edge, 1.0)
    assert (K @ q[:3])[0] / q[2] == pytest.approx(64.0)


def test_camera_vectors_normalise_translation():
    c2w = cameras.orbit_c2w(15.0, np.arange(4) * 90.0, 3.7)
    vec = cameras.camera_vectors(c2w)
    torch.testing.assert_close(vec, cameras.get_camera(4), atol=1e-6, rtol=0)


def test_render_rig_sampler():
    rig = cameras.sample_mvdream_render_rig(np.random.default_rng(1), num_views=32)
    az = np.array(rig["azimuth_deg"])
    gaps = np.diff(np.sort(az))
    np.testing.assert_allclose(gaps, 360 / 32, atol=1e-9)
    assert len(set(rig["elevation_deg"])) == 1 and 0 <= rig["elevation_deg"][0] <= 30
    assert len(set(rig["fov_deg"])) == 1 and 15 <= rig["fov_deg"][0] <= 60
    # the framing distance keeps the unit cube's bounding sphere inside the frustum (x 0.9)
    fov = math.radians(rig["fov_deg"][0])
    assert rig["distance"][0] * math.sin(fov / 2) >= 0.9 * math.sqrt(3) / 2 - 1e-9
    assert rig["c2w"].shape == (32, 4, 4)


def test_training_views_are_90_degrees_apart():
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        idx = cameras.select_training_views(32, 4, generator=g)
        assert [(b - a) % 32 for a, b in zip(idx, idx[1:])] == [8, 8, 8]
        starts.add(idx[0])
    assert len(starts) > 10  # random start index
    with pytest.raises(ValueError):
        cameras.select_training_views(30, 4)


def test_sds_group():
    g = torch.Generator().manual_seed(0)
    group = cameras.sample_sds_group(g)
    az = group["azimuth_deg"].numpy()
    np.testing.assert_allclose(
        np.diff(np.unwrap(np.radians(az))) % (2 * np.pi), np.pi / 2, atol=1e-5
    )
    assert group["camera"].shape == (4, 16) and group["c2w"].shape == (4, 4, 4)
    assert 0 <= float(group["elevation_deg"][0]) <= 30 and 15 <= float(group["fov_deg"][0]) <= 60
    # the model vectors are get_camera's for that elevation and start azimuth
    ref = cameras.get_camera(4, float(group["elevation_deg"][0]), float(az[0]))
    torch.testing.assert_close(group["camera"], ref, atol=1e-5, rtol=0)
