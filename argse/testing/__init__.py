"""What the test suite and the benchmarks in bench/ share, installed with the package so that both
import it as they import the library: the brute-force oracle over the K = 2 rule family
(:mod:`argse.testing.oracle`), the logged fashion-mnist-lt run of tests/data and the known-posterior
population drawn from it (:mod:`argse.testing.logged_run`), folders of image files as users bring
them (:mod:`argse.testing.image_folders`), and a two-node Ray cluster on the loopback
(:mod:`argse.testing.ray_cluster`, :mod:`argse.testing.process_tree`). No stage imports it."""
