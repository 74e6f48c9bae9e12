// /users: Suspend / Activate call the API with the session cookie, then show the page again.
import {send} from "./common.js";

const problem = document.getElementById("users-error");

for (const button of document.querySelectorAll("button.user-status")) {
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await send("PUT", `/api/v2/users/${encodeURIComponent(button.dataset.user)}/status/${button.dataset.action}`);
      window.location.reload();
    } catch (err) {
      problem.textContent = err.message;
      problem.hidden = false;
      button.disabled = false;
    }
  });
}
