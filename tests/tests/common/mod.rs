//! Shared by the integration test files; each file is its own crate and includes this.

/// For every `name`, defines the tests `kernel::name` and `userspace::name`, each calling
/// `name(Dataplane) -> anyhow::Result<()>` from the including file after the privilege
/// check: one suite, both data paths.
macro_rules! dataplane_tests {
    ($($test:ident),+ $(,)?) => {
        $crate::common::dataplane_tests!(@on kernel Kernel: $($test),+);
        $crate::common::dataplane_tests!(@on userspace Userspace: $($test),+);
    };
    (@on $module:ident $dataplane:ident: $($test:ident),+) => {
        mod $module {
            $(
                #[test]
                fn $test() -> anyhow::Result<()> {
                    let name = concat!(module_path!(), "::", stringify!($test));
                    if !yensid_tests::privileged_or_skip(name) {
                        return Ok(());
                    }
                    super::$test(yensid_tests::Dataplane::$dataplane)
                }
            )+
        }
    };
}
pub(crate) use dataplane_tests;
