//! Every scenario on the embedded in-memory transport.

catga_tests::scenario_tests!(catga_tests::Backend::memory());
