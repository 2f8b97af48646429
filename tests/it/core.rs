//! Sessions, login, registration and the shell commands.

use crate::common::*;
use ftpx::protocol::Request;

#[tokio::test(flavor = "multi_thread")]
async fn login_and_pwd() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let mut c = s.login("ann").await;
    let r = c.request(&Request::Pwd).await.unwrap();
    assert_eq!(r.code, 257);
    assert_eq!(r.text, "/");
    s.stop().await;
}
