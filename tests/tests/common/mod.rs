//! Shared by the integration test files; each file is its own crate and includes this,
//! using some of it (hence the `allow(unused_*)`).

/// Defines, for every variant and every test `name`, the test `<module>::name`, which
/// calls `name(<Type>::<Variant>) -> anyhow::Result<()>` from the including file after
/// the privilege check: one suite, run once per variant.
macro_rules! variant_tests {
    ($type:ident { $($module:ident: $variant:ident),+ $(,)? }: $($test:ident),+ $(,)?) => {
        $crate::common::variant_tests!(@each $type [$($test),+] $($module $variant)+);
    };
    (@each $type:ident [$($test:ident),+]) => {};
    (@each $type:ident [$($test:ident),+] $module:ident $variant:ident $($rest:tt)*) => {
        mod $module {
            $(
                #[test]
                fn $test() -> anyhow::Result<()> {
                    let name = concat!(module_path!(), "::", stringify!($test));
                    if !yensid_tests::privileged_or_skip(name) {
                        return Ok(());
                    }
                    super::$test(yensid_tests::$type::$variant)
                }
            )+
        }
        $crate::common::variant_tests!(@each $type [$($test),+] $($rest)*);
    };
}
#[allow(unused_imports)]
pub(crate) use variant_tests;

/// For every `name`, defines the tests `kernel::name` and `userspace::name`: one suite,
/// both data paths.
#[allow(unused_macros)]
macro_rules! dataplane_tests {
    ($($test:ident),+ $(,)?) => {
        $crate::common::variant_tests!(Dataplane { kernel: Kernel, userspace: Userspace }: $($test),+);
    };
}
#[allow(unused_imports)]
pub(crate) use dataplane_tests;
