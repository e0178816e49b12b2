"""Simpson's biplane method of disks against analytic ellipsoids (issue 7: volumes within 3%, EF within 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monai_peft.echo import disk_profile, ejection_fraction, simpson_biplane, simpson_biplane_ef


def ellipse_mask(shape, spacing, centre_mm, a, b, tilt_deg=0.0):
    """Binary (H, W) cross-section of an ellipsoid: semi-axis ``a`` along the (tilted) vertical, ``b`` across."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    y, x = rows * spacing[0] - centre_mm[0], cols * spacing[1] - centre_mm[1]
    t = math.radians(tilt_deg)
    u = y * math.cos(t) - x * math.sin(t)
    v = y * math.sin(t) + x * math.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


CASES = [
    # (a, b, c, spacing_2ch, spacing_4ch, tilt_2ch, tilt_4ch)
    (40.0, 15.0, 18.0, (0.3, 0.3), (0.3, 0.3), 0.0, 0.0),
    (45.0, 20.0, 22.0, (0.31, 0.42), (0.45, 0.28), 0.0, 0.0),  # anisotropic pixels
    (38.0, 17.0, 16.0, (0.35, 0.35), (0.4, 0.4), 12.0, -20.0),  # tilted long axes
    (30.0, 12.0, 13.0, (0.8, 0.8), (0.9, 0.9), 5.0, 0.0),  # coarse grid: ~35 pixels long
]


@pytest.mark.parametrize("a,b,c,sp2,sp4,t2,t4", CASES)
def test_ellipsoid_volume_within_3_percent(a, b, c, sp2, sp4, t2, t4):
    m2 = ellipse_mask((int(2.6 * a / sp2[0]), int(3.0 * b / sp2[1]) + 40), sp2, (1.3 * a, 1.5 * b + 10), a, b, t2)
    m4 = ellipse_mask((int(2.6 * a / sp4[0]), int(3.0 * c / sp4[1]) + 40), sp4, (1.3 * a, 1.5 * c + 10), a, c, t4)
    exact = 4.0 / 3.0 * math.pi * a * b * c / 1000.0
    v = simpson_biplane(m2, m4, sp2, sp4)
    assert abs(v - exact) / exact < 0.03, (v, exact)
    prof = disk_profile(m2, sp2)
    assert abs(prof.length_mm - 2 * a) / (2 * a) < 0.03
    assert prof.diameters_mm.shape == (20,)
    # the apex-first direction points to row 0 and follows the tilt
    assert prof.axis[0] < 0
    assert abs(abs(math.degrees(math.atan2(prof.axis[1], -prof.axis[0]))) - abs(t2)) < 2.0


def test_half_ellipsoid_volume():
    """A truncated (apex-to-equator) ellipsoid: the LV shape with a flat mitral plane."""
    a, b, c, sp = 60.0, 20.0, 24.0, (0.4, 0.4)
    m2 = ellipse_mask((260, 160), sp, (70.0, 32.0), a, b)
    m4 = ellipse_mask((260, 160), sp, (70.0, 32.0), a, c)
    base_row = int(70.0 / sp[0])
    m2[base_row:], m4[base_row:] = False, False
    exact = 2.0 / 3.0 * math.pi * a * b * c / 1000.0
    assert abs(simpson_biplane(m2, m4, sp, sp) - exact) / exact < 0.03


def test_ejection_fraction_within_2_points():
    sp = (0.3, 0.3)
    rng = np.random.default_rng(0)
    for _ in range(3):
        a, b, c = rng.uniform(35, 45), rng.uniform(15, 20), rng.uniform(16, 22)
        k_long, k = 0.9, rng.uniform(0.6, 0.9)
        ed2 = ellipse_mask((330, 200), sp, (60, 30), a, b)
        ed4 = ellipse_mask((330, 200), sp, (60, 30), a, c)
        es2 = ellipse_mask((330, 200), sp, (60, 30), a * k_long, b * k)
        es4 = ellipse_mask((330, 200), sp, (60, 30), a * k_long, c * k)
        res = simpson_biplane_ef(ed2, es2, ed4, es4, sp, sp)
        exact_ef = (1 - k_long * k * k) * 100
        assert abs(res["EF"] - exact_ef) < 2.0, (res, exact_ef)
        assert res["EDV"] > res["ESV"] > 0


def test_bad_inputs_are_named():
    m = ellipse_mask((100, 80), (1, 1), (50, 40), 30, 10)
    with pytest.raises(ValueError, match="mask_4ch"):
        simpson_biplane(m, np.zeros_like(m), 1.0, 1.0)
    with pytest.raises(ValueError, match="mask_2ch"):
        simpson_biplane(np.ones((4, 4, 4)), m, 1.0, 1.0)
    with pytest.raises(ValueError, match="spacing"):
        simpson_biplane(m, m, (0.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="edv"):
        ejection_fraction(0.0, 1.0)
