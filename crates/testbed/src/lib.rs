//! Real test components for virt-snap's tests.
