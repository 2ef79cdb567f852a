//! Every scenario over a real nats-server.

catga_tests::scenario_tests!(catga_tests::Backend::nats());
